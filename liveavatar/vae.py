"""Wan 2.1 VAE for the engine: normalised encode, causal streaming decode, uint8 frames.

The network itself is diffusers' ``AutoencoderKLWan``; this module adds what LiveAvatar
needs around it:

* Wan's latent normalisation: ``encode`` returns ``(mu - mean[c]) / std[c]`` (the mean of the
  posterior only, never a sample); decoding first applies ``z * std[c] + mean[c]``.
* :class:`StreamingDecoder`: one object per video that keeps the decoder's causal-convolution
  cache between calls, so feeding latents in pieces gives exactly the frames of one decode of
  their concatenation. Its state is a fixed number of small tensors (at most two cached time
  steps per causal conv), so time and memory per call do not grow with the stream's length.
* :class:`BlockDecoder`: the TPP decode schedule (warm the decoder on the oldest motion
  latents and throw those frames away, then one call per denoised block, dropping the first
  frames of the first block).
* :func:`to_uint8`: float frames in [-1, 1] -> ``uint8 [n, H, W, 3]`` as upstream saves them.

Torch only (plus diffusers); nothing here knows about files or ComfyUI.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import SamplerConfig

__all__ = ["WanVAE", "StreamingDecoder", "BlockDecoder", "to_uint8"]

_SAMPLER_DEFAULTS = SamplerConfig()


def _causal_conv_type():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return WanCausalConv3d


class WanVAE:
    """A diffusers ``AutoencoderKLWan`` with Wan's per-channel latent normalisation.

    Tensors are unbatched, as upstream passes them: video ``[3, T, H, W]`` in [-1, 1] and
    latents ``[z_dim, t, h, w]``. A leading batch axis of size 1 is accepted and kept.
    """

    def __init__(
        self,
        model,
        latents_mean: Sequence[float] | torch.Tensor | None = None,
        latents_std: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        cfg = model.config
        if getattr(cfg, "is_residual", False) or getattr(cfg, "patch_size", None) is not None:
            raise ValueError("WanVAE wraps the Wan 2.1 VAE; got a Wan 2.2-style (residual/patchified) AutoencoderKLWan")
        self.model = model.eval().requires_grad_(False)
        self.z_dim = int(cfg.z_dim)
        mean = cfg.latents_mean if latents_mean is None else latents_mean
        std = cfg.latents_std if latents_std is None else latents_std
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != self.z_dim or std.numel() != self.z_dim:
            raise ValueError(
                f"latent mean/std need {self.z_dim} values (the VAE's z_dim), got {mean.numel()} and {std.numel()}"
            )
        if not bool(torch.all(std > 0)):
            raise ValueError("latent std values must be positive")
        # Upstream keeps (mean, 1/std) and multiplies / divides by the inverse; do the same so
        # float32 results agree to the last bit as far as possible.
        self._mean = mean.view(self.z_dim, 1, 1, 1)
        self._inv_std = (1.0 / std).view(self.z_dim, 1, 1, 1)
        self.temporal_stride = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial_stride = 2 ** (len(cfg.dim_mult) - 1)
        self._decoder_convs = sum(isinstance(m, _causal_conv_type()) for m in self.model.decoder.modules())

    # ------------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "WanVAE":
        self.model.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ normalisation
    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """``(mu - mean) / std`` per channel; ``mu`` is ``[C, t, h, w]``."""
        mu = mu.float()
        return (mu - self._mean.to(mu.device)) * self._inv_std.to(mu.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z * std + mean`` per channel; ``z`` is ``[C, t, h, w]``."""
        z = z.float()
        return z / self._inv_std.to(z.device) + self._mean.to(z.device)

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[3, T, H, W]`` in [-1, 1] -> normalised latent mean ``[z, 1 + (T-1)//4, H/8, W/8]``.

        Frames are fed to the causal encoder in chunks of 1, 4, 4, ... (diffusers' loop),
        so ``T`` should be ``1 + 4k``; trailing frames that do not fill a chunk are ignored.
        Returns float32 on the VAE's device.
        """
        batched = video.dim() == 5
        if batched:
            if video.shape[0] != 1:
                raise ValueError(f"encode takes one video, got a batch of {video.shape[0]}")
            video = video[0]
        if video.dim() != 4 or video.shape[0] != self.model.config.in_channels:
            raise ValueError(f"encode expects a video [3, T, H, W], got shape {tuple(video.shape)}")
        _, _, height, width = video.shape
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(f"video size {height}x{width} must be a multiple of {self.spatial_stride}")
        x = video.to(device=self.device, dtype=self.dtype)[None]
        moments = self.model.encode(x).latent_dist
        mu = moments.mean[0]
        latent = self.normalize(mu)
        return latent[None] if batched else latent

    # ------------------------------------------------------------------ decode
    def streaming_decoder(self) -> "StreamingDecoder":
        """A fresh decoder with empty causal caches (one per video)."""
        return StreamingDecoder(self)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot decode: ``[z, t, h, w]`` -> frames ``[3, 1 + 4(t-1), 8h, 8w]`` clamped to [-1, 1]."""
        return StreamingDecoder(self).decode(latents)


class StreamingDecoder:
    """Causal decode of one latent stream, fed in pieces.

    The first latent frame of the stream yields 1 video frame, every later one 4 (for the
    standard temporal stride of 4), and the concatenated outputs of successive
    :meth:`decode` calls equal one decode of the concatenated latents. Create one per video:
    the caches belong to this object, never to the shared VAE.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.latent_frames_in = 0
        self.frames_out = 0
        self._cache: list = [None] * vae._decoder_convs

    def reset(self) -> None:
        """Forget the stream (start a new video with the same object)."""
        self._cache = [None] * self.vae._decoder_convs
        self.latent_frames_in = 0
        self.frames_out = 0

    def frames_for(self, latent_frames: int) -> int:
        """How many video frames the next ``latent_frames`` latents will produce."""
        if latent_frames <= 0:
            return 0
        stride = self.vae.temporal_stride
        return latent_frames * stride - (stride - 1 if self.latent_frames_in == 0 else 0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[z, t, h, w]`` -> frames ``[3, n, 8h, 8w]`` in [-1, 1].

        Returned in the VAE's dtype on its device.
        """
        batched = latents.dim() == 5
        if batched:
            if latents.shape[0] != 1:
                raise ValueError(f"decode takes one latent stream, got a batch of {latents.shape[0]}")
            latents = latents[0]
        vae = self.vae
        if latents.dim() != 4 or latents.shape[0] != vae.z_dim:
            raise ValueError(f"decode expects latents [{vae.z_dim}, t, h, w], got shape {tuple(latents.shape)}")
        model = vae.model
        z = vae.denormalize(latents.to(vae.device)).to(vae.dtype)[None]
        x = model.post_quant_conv(z)  # 1x1x1: frame-wise, no temporal state
        outs = []
        for i in range(x.shape[2]):
            first = self.latent_frames_in == 0
            out = model.decoder(x[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=first)
            self.latent_frames_in += 1
            outs.append(out)
        if not outs:
            h, w = latents.shape[-2:]
            s = vae.spatial_stride
            return latents.new_zeros((3, 0, h * s, w * s), dtype=vae.dtype, device=vae.device)
        frames = torch.cat(outs, dim=2).clamp_(-1.0, 1.0)[0]
        self.frames_out += frames.shape[1]
        return frames[None] if batched else frames


class BlockDecoder:
    """The TPP decode schedule on top of a :class:`StreamingDecoder`.

    ``warm_up(motion_latents)`` decodes the ``warmup_latents`` oldest motion latents and
    discards the frames (they only fill the causal caches); then every ``decode_block`` call
    decodes one denoised block, and the first block loses its first ``drop_first_frames``
    frames. With upstream's numbers (7, 3) and 3-latent blocks: 25 warm-up frames discarded,
    9 frames from the first block, 12 from every later one. The video equals one decode of
    ``[motion[:, :7], block0, block1, ...]`` minus its first 28 frames.
    """

    def __init__(
        self,
        vae: WanVAE,
        warmup_latents: int | None = None,
        drop_first_frames: int | None = None,
    ) -> None:
        self.warmup_latents = _SAMPLER_DEFAULTS.decoder_warmup_latents if warmup_latents is None else int(warmup_latents)
        self.drop_first_frames = (
            _SAMPLER_DEFAULTS.dropped_first_frames if drop_first_frames is None else int(drop_first_frames)
        )
        if self.warmup_latents < 0 or self.drop_first_frames < 0:
            raise ValueError("warmup_latents and drop_first_frames must be >= 0")
        self.decoder = vae.streaming_decoder()
        self.blocks_decoded = 0
        self._warmed = False

    @classmethod
    def from_config(cls, vae: WanVAE, cfg: SamplerConfig) -> "BlockDecoder":
        return cls(vae, cfg.decoder_warmup_latents, cfg.dropped_first_frames)

    def warm_up(self, motion_latents: torch.Tensor) -> None:
        """Feed the oldest ``warmup_latents`` motion latents ``[z, T, h, w]``; output discarded."""
        if self._warmed or self.blocks_decoded:
            raise RuntimeError("warm_up must be called once, before the first block")
        if motion_latents.dim() == 5:
            motion_latents = motion_latents[0]
        if self.warmup_latents:
            have = motion_latents.shape[1]
            if have < self.warmup_latents:
                raise ValueError(
                    f"decoder warm-up needs {self.warmup_latents} motion latent frames, got {have}"
                )
            self.decoder.decode(motion_latents[:, : self.warmup_latents])
        self._warmed = True

    def decode_block(self, block_latents: torch.Tensor) -> torch.Tensor:
        """One denoised block ``[z, t, h, w]`` -> its video frames ``[3, n, H, W]``."""
        if not self._warmed and self.warmup_latents:
            raise RuntimeError("call warm_up(motion_latents) before the first block")
        frames = self.decoder.decode(block_latents)
        if self.blocks_decoded == 0 and self.drop_first_frames:
            frames = frames[:, self.drop_first_frames :]
        self.blocks_decoded += 1
        return frames


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames ``[3, n, H, W]`` in [-1, 1] -> ``uint8 [n, H, W, 3]`` on the CPU.

    ``trunc(((clamp(x, -1, 1) + 1) / 2) * 255)``, computed in float32 as upstream's writer does.
    """
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"to_uint8 expects frames [3, n, H, W], got shape {tuple(frames.shape)}")
    x = frames.float().clamp(-1.0, 1.0)
    x = ((x + 1.0) / 2.0) * 255.0
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu()
