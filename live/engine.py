"""The models a live server holds, and the rule "one generation at a time" per engine."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..liveavatar.config import SamplerConfig
from ..liveavatar.image import load_reference_image, resize_center_crop
from ..liveavatar.pipeline import encode_reference
from ..liveavatar.sampler import Cancelled, SinkInputs, StreamingSampler
from ..liveavatar.stream_audio import StreamingAudioConfig, StreamingFeatures
from ..liveavatar.transformer import TextContext


@dataclass
class LiveModels:
    model: Any  # LiveAvatarTransformer (None when a worker pool holds it)
    vae: Any  # WanVAE
    audio_encoder: torch.nn.Module
    text: TextContext | torch.Tensor
    cfg: SamplerConfig
    size: str  # maximum pixel area W*H
    seed: int
    image: Any  # default reference (PIL image or path)
    name: str = "models"
    stream: StreamingAudioConfig = field(default_factory=StreamingAudioConfig)
    spec: dict | None = None  # the DiT as a worker pool's model spec (distributed/launcher.py model_spec)


LIVE_HOURS = 24  # a pool job covers this much video; a longer session simply starts the next job


class Engine:
    """Holds the models; hands out the single generation slot; caches encoded references.

    With ``pool`` (``PoolOptions``, e.g. 2 workers in tpp) the DiT runs on a warm worker pool started
    once with the server (:meth:`start`) and released with it (:meth:`close`); the VAE, the audio
    features and the encoder stay in this process. One session at a time uses the pool."""

    def __init__(self, models: LiveModels, pool: Any = None):
        self.models = models
        self.pool = None
        self.closed = False
        if pool is not None:
            from ..distributed.launcher import WorkerPool, check_sp_layout

            if models.spec is None:
                raise ValueError(f"{models.name}: no worker model spec, so no worker pool")
            if not torch.is_tensor(models.text):
                raise ValueError("a worker pool takes the text context as a tensor [L, text_dim]")
            check_sp_layout(pool.mode, pool.workers * pool.nnodes, pool.sp_size, models.cfg.steps)
            self.text_tensor = models.text.detach().cpu()
            self.pool = WorkerPool(pool)
        if self.pool is None and not isinstance(models.text, TextContext):
            models.text = models.model.embed_text(models.text)
        self._slot = threading.Lock()
        self._refs: OrderedDict[str, SinkInputs] = OrderedDict()
        self._refs_lock = threading.Lock()
        self.sessions_started = 0
        self.active = None  # the LiveSession holding the slot, if any

    # -- the slot ------------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        return self._slot.acquire(blocking=False)

    def release(self) -> None:
        self.active = None
        self._slot.release()

    @property
    def busy(self) -> bool:
        return self._slot.locked()

    # -- the worker pool -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers now (the server starts listening once they are warm); no-op without a pool."""
        if self.pool is not None:
            self.pool.start()
            self._warm_up()

    def _warm_up(self) -> None:
        """One clip of silence through the pool: a fresh pool's first blocks pay one-off costs (first
        collectives, kernels), which the first session's time to first frame would otherwise show; this
        also encodes (caches) the default reference."""
        from ..distributed.sampler import DistributedSampler
        from ..liveavatar.sampler import TensorAudio

        m = self.models
        feats = self.features()
        feats.pad_silence(feats.samples_needed(m.cfg.frames_per_clip))
        audio = TensorAudio(feats.frames(0, m.cfg.frames_per_clip))
        sampler = DistributedSampler(self.pool, m.cfg, self.text_tensor, audio, self.encode(self.pixels()), m.seed)
        for _ in sampler.blocks(1):
            pass

    def close(self, wait_s: float = 60.0) -> None:
        """Release the workers: the running session (if any) is cancelled and waited for, then the pool closes
        (a session that starts later refuses to relaunch it). No-op without a pool."""
        if self.pool is None:
            return
        self.closed = True
        session = self.active
        if session is not None:
            session.cancel()
            session.thread.join(wait_s)
        self.pool.close()

    def sampler(self, sink: SinkInputs, audio, check_cancel):
        """The block source of one reference: ``(sampler, num_clips)``, local or on the pool."""
        m = self.models
        if self.pool is None:
            return StreamingSampler(m.model, m.cfg, m.text, audio, sink, m.seed, check_cancel=check_cancel), 1 << 30
        from ..distributed.sampler import DistributedSampler

        if self.closed:
            raise Cancelled("the server is shutting down")
        sampler = DistributedSampler(self.pool, m.cfg, self.text_tensor, audio, sink, m.seed,
                                     check_cancel=check_cancel)
        sampler.poll_s = 0.01  # the live feed is polled: a block's audio goes out within 10 ms of arriving
        return sampler, -(-LIVE_HOURS * 3600 * m.cfg.fps // m.cfg.frames_per_clip)

    # -- references ----------------------------------------------------------------------------------
    def pixels(self, image: Any = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Reference pixels [3, H, W] in [-1, 1]: the size from the budget, or exactly ``size`` (H, W)."""
        image = self.models.image if image is None else image
        if size is None:
            return load_reference_image(image, self.models.size)
        from ..liveavatar.image import to_pil

        arr = resize_center_crop(to_pil(image), *size)
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div(255) * 2 - 1

    def encode(self, pixels: torch.Tensor) -> SinkInputs:
        """VAE-encode a reference (cached: the same image costs nothing the second time).
        Called from the session thread only, never beside a running decode (the VAE keeps a cache)."""
        key = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
        with self._refs_lock:
            if key in self._refs:
                self._refs.move_to_end(key)
                return self._refs[key]
        with torch.inference_mode():
            sink = encode_reference(self.models.vae, pixels, self.models.cfg)
        with self._refs_lock:
            self._refs[key] = sink
            while len(self._refs) > 4:
                self._refs.popitem(last=False)
        return sink

    def features(self) -> StreamingFeatures:
        return StreamingFeatures(self.models.audio_encoder, self.models.stream)


def demo_models(size: str = "128*128", seed: int = 42, steps: int = 4, frames_per_clip: int = 48,
                prompt: str = "a person talking to the camera",
                stream: StreamingAudioConfig = StreamingAudioConfig()) -> LiveModels:
    """Tiny random models and the synthetic face, exactly as ``python -m liveavatar demo`` builds them."""
    from ..liveavatar.config import TINY, replace
    from ..liveavatar.demo_assets import synth_face
    from ..liveavatar.text import encode_text
    from ..liveavatar.tiny import byte_tokens, tiny_audio_encoder, tiny_text_encoder, tiny_transformer, tiny_vae

    cfg = SamplerConfig(steps=steps, frames_per_clip=frames_per_clip)
    cfg.validate()
    text_encoder = tiny_text_encoder(seed=3)
    dit_cfg = replace(TINY, text_dim=text_encoder.config.d_model)
    ids, mask = byte_tokens(prompt, text_encoder.config.vocab_size, dit_cfg.text_len)
    with torch.inference_mode():
        text = encode_text(text_encoder, ids, mask)
    return LiveModels(tiny_transformer(seed=seed, cfg=dit_cfg), tiny_vae(seed=1), tiny_audio_encoder(seed=2), text,
                      cfg, size, seed, synth_face(), "tiny demo models", stream,
                      spec={"kind": "tiny", "seed": seed, "config": dict(dit_cfg.__dict__)})
