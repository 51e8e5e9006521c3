"""Find the model files of a run in a folder: upstream's checkpoint layout or ComfyUI's ``models/``.

Only locating happens here (by the names the releases use); each loader then checks
the file's keys itself. A missing part is reported with where to get it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

WHERE = {
    "dit": "Wan-AI/Wan2.2-S2V-14B (the sharded diffusion_pytorch_model-*.safetensors + config.json), "
    "or ComfyUI's wan2.2_s2v_14B_bf16.safetensors / _fp8_scaled.safetensors in models/diffusion_models/",
    "lora": "Quark-Vision/Live-Avatar: liveavatar.safetensors (ComfyUI: models/loras/)",
    "vae": "Wan2.2-S2V-14B/Wan2.1_VAE.pth, or ComfyUI's wan_2.1_vae.safetensors in models/vae/",
    "text_encoder": "Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth, or ComfyUI's umt5_xxl_fp16.safetensors "
    "(or _fp8_e4m3fn_scaled) in models/text_encoders/",
    "tokenizer": "Wan2.2-S2V-14B/google/umt5-xxl/ (the tokenizer files of google/umt5-xxl)",
    "audio_encoder": "Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/ (HF folder), or ComfyUI's "
    "wav2vec2_large_english_fp16.safetensors in models/audio_encoders/",
}

_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass
class ModelFiles:
    dit: Path | None = None
    lora: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    audio_encoder: Path | None = None

    def missing(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is None]

    def require(self, root: Path) -> "ModelFiles":
        missing = self.missing()
        if missing:
            lines = "\n".join(f"  - {name}: get {WHERE[name]}" for name in missing)
            raise FileNotFoundError(f"{root}: model files not found:\n{lines}")
        return self


def _walk(root: Path, max_depth: int = 4):
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if len(here.parts) - root_depth >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        yield here, sorted(dirnames), sorted(filenames)


def _name_has(name: str, *words: str) -> bool:
    low = name.lower().replace("-", "_").replace(".", "_")
    return all(w in low for w in words)


def find_model_files(root: str | os.PathLike, **overrides: str | os.PathLike | None) -> ModelFiles:
    """Locate each part under ``root``; explicit ``overrides`` (e.g. ``lora=...``) win."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"models folder {root} does not exist")
    found = ModelFiles()
    for here, _dirs, files in _walk(root):
        names = set(files)
        if found.dit is None and any(f.endswith(".safetensors.index.json") and "diffusion" in f for f in names):
            found.dit = here
        if found.tokenizer is None and names & set(_TOKENIZER_FILES) and "umt5" in here.name.lower():
            found.tokenizer = here
        if found.audio_encoder is None and "config.json" in names and _name_has(here.name, "wav2vec2"):
            found.audio_encoder = here
        for f in files:
            if not f.endswith(_WEIGHT_SUFFIXES):
                continue
            path = here / f
            if found.lora is None and _name_has(f, "liveavatar"):
                found.lora = path
            elif found.dit is None and _name_has(f, "s2v") and here.name != "loras":
                found.dit = path
            elif found.vae is None and (_name_has(f, "vae") and ("2_1" in f.replace(".", "_") or "wan" in f.lower())):
                found.vae = path
            elif found.text_encoder is None and _name_has(f, "umt5"):
                found.text_encoder = path
            elif found.audio_encoder is None and _name_has(f, "wav2vec2") and here.name == "audio_encoders":
                found.audio_encoder = path
    for key, value in overrides.items():
        if value is not None:
            path = Path(value)
            if not path.exists():
                raise FileNotFoundError(f"--{key.replace('_', '-')} {path} does not exist")
            setattr(found, key, path)
    return found
