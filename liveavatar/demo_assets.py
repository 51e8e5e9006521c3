"""Synthetic inputs for the demo: a cartoon face and a speech-like tone, made on the fly."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def synth_face(width: int = 320, height: int = 384) -> Image.Image:
    """A simple face on a gradient background (RGB)."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    bg = (np.concatenate([0.3 + 0.4 * x + 0 * y, 0.4 + 0.3 * y + 0 * x, 0.7 - 0.3 * x + 0 * y], axis=2) * 255)
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    cx, cy, rx, ry = width // 2, int(height * 0.45), int(width * 0.3), int(height * 0.32)
    d.rectangle([cx - rx, cy + ry - 10, cx + rx, height], fill=(60, 80, 140))  # shoulders
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(236, 188, 160))
    d.ellipse([cx - rx, cy - ry, cx + rx, cy - ry // 3], fill=(70, 45, 30))  # hair
    for ex in (cx - rx // 2, cx + rx // 2):
        d.ellipse([ex - 14, cy - 20, ex + 14, cy + 2], fill=(255, 255, 255))
        d.ellipse([ex - 6, cy - 14, ex + 6, cy - 2], fill=(40, 30, 20))
    d.ellipse([cx - rx // 3, cy + ry // 3, cx + rx // 3, cy + ry // 2 + 8], fill=(170, 60, 70))
    return img


def synth_speech(seconds: float = 3.5, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Voiced harmonics with a gliding pitch, moving formants and a 4 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 140 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    formant = 700 + 400 * np.sin(2 * np.pi * 1.3 * t)
    wave = sum(np.sin(k * phase) * np.exp(-(((k * pitch) - formant) / 500) ** 2) for k in range(1, 25))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.6
    audio = wave * envelope + 0.01 * rng.standard_normal(t.shape)
    return (0.5 * audio / np.abs(audio).max()).astype(np.float32)
