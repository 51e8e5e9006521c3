"""Wan 2.1 VAE files -> the engine's :class:`~..liveavatar.vae.WanVAE`.

Accepted inputs:

* Wan's ``Wan2.1_VAE.pth`` (a plain state dict, loaded with ``torch.load(weights_only=True)``),
* ComfyUI's ``wan_2.1_vae.safetensors`` (the same tensors and key names, any float dtype; ``.sft`` too),
* a diffusers ``AutoencoderKLWan`` state dict in a ``.safetensors`` file,
* a diffusers model directory (``config.json`` + weights).

The network is diffusers' ``AutoencoderKLWan``. Its configuration is read off the tensors'
shapes (base width from the first conv, latent channels, width multipliers, residual blocks
per level, which levels downsample in time), so the real 96-wide VAE and tiny test VAEs load
the same way. An optional ``config`` (dict or JSON file in Wan's naming: ``dim``, ``z_dim``,
``dim_mult``, ``num_res_blocks``, ``temperal_downsample``, ``latent_mean``, ``latent_std``) is
checked against the tensors and supplies the latent normalisation; without one, Wan 2.1's
published mean/std (diffusers' defaults) are used. Files are read through
``formats.open_checkpoint``, one tensor at a time straight into the target dtype (load peak ~1x).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..liveavatar.vae import WanVAE
from .formats import Checkpoint, ModelFileError, check_regular, open_checkpoint

__all__ = ["load_wan_vae", "open_vae_file", "infer_wan_vae_config", "build_wan_vae", "wan_vae_key_names",
           "to_wan_state_dict"]

_EXPECTED = "a Wan 2.1 VAE (Wan2.1_VAE.pth / wan_2.1_vae.safetensors: keys such as encoder.conv1.weight, conv1.weight, conv2.weight, decoder.head.2.weight)"
_WAN_KEYS = ("encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.conv1.weight", "decoder.head.2.weight")
_DIFFUSERS_KEYS = ("encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_out.weight")
_PREFIXES = ("first_stage_model.", "vae.", "model.")


def _describe(sd: Mapping[str, torch.Tensor], limit: int = 6) -> str:
    keys = sorted(sd)
    shown = ", ".join(f"{k} {tuple(sd[k].shape)}" for k in keys[:limit])
    more = f", ... ({len(keys)} tensors)" if len(keys) > limit else f" ({len(keys)} tensors)"
    return (shown + more) if keys else "no tensors"


def open_vae_file(path: str | Path) -> Checkpoint:
    """Open a VAE file for lazy reading (``formats.open_checkpoint``: .safetensors/.sft/.pth/...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE file {path} does not exist")
    try:
        return open_checkpoint(path)
    except ModelFileError as err:
        raise ModelFileError(f"VAE file {err}; expected {_EXPECTED}") from None


class _Source:
    """What the builder reads from: a lazy ``Checkpoint`` or an in-memory state dict, under stripped names."""

    def __init__(self, sd: Mapping[str, torch.Tensor] | Checkpoint):
        self.ckpt = sd if isinstance(sd, Checkpoint) else None
        keys = list(sd.keys())
        self.raw = {k: k for k in keys}
        for prefix in _PREFIXES:
            if keys and all(k.startswith(prefix) for k in keys):
                self.raw = {k[len(prefix):]: k for k in keys}
                break
        if self.ckpt is not None:
            self.shapes = {k: torch.empty(self.ckpt.shape(r), dtype=self.ckpt.dtype(r), device="meta")
                           for k, r in self.raw.items()}
        else:
            self.sd = sd
            self.shapes = {k: sd[r] for k, r in self.raw.items()}

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if self.ckpt is not None:
            return self.ckpt.read_as(self.raw[key], dtype)
        return self.sd[self.raw[key]].to(dtype=dtype)


def infer_wan_vae_config(sd: Mapping[str, torch.Tensor], name: str = "state dict") -> dict[str, Any]:
    """Diffusers ``AutoencoderKLWan`` arguments read off a Wan-layout state dict's shapes."""
    missing = [k for k in _WAN_KEYS if k not in sd]
    if missing:
        raise ValueError(f"VAE file {name}: expected {_EXPECTED}; missing {missing}; found {_describe(sd)}")
    base_dim = int(sd["encoder.conv1.weight"].shape[0])
    in_channels = int(sd["encoder.conv1.weight"].shape[1])
    z_dim = int(sd["conv2.weight"].shape[0])
    if tuple(sd["conv1.weight"].shape[:2]) != (2 * z_dim, 2 * z_dim):
        raise ValueError(
            f"VAE file {name}: expected conv1.weight of shape ({2 * z_dim}, {2 * z_dim}, 1, 1, 1) for z_dim {z_dim}, "
            f"found {tuple(sd['conv1.weight'].shape)}"
        )
    # Encoder: downsamples.i is a residual block, an attention block or a resample; resamples
    # separate the levels. A residual block's output width is its second conv's out channels.
    entries: dict[int, str] = {}
    pattern = re.compile(r"^encoder\.downsamples\.(\d+)\.(residual|resample|time_conv|to_qkv|norm|proj|shortcut)\.")
    for key in sd:
        m = pattern.match(key)
        if m is None:
            if key.startswith("encoder.downsamples."):
                raise ValueError(
                    f"VAE file {name}: expected {_EXPECTED}; found unknown encoder key {key!r} "
                    "(a Wan 2.2 VAE or another model?)"
                )
            continue
        idx, kind = int(m.group(1)), m.group(2)
        kind = {"time_conv": "resample", "shortcut": "residual"}.get(kind, kind)
        if kind in ("to_qkv", "norm", "proj"):
            kind = "attn"
        if entries.get(idx, kind) != kind:
            raise ValueError(f"VAE file {name}: encoder.downsamples.{idx} mixes {entries[idx]} and {kind} tensors")
        entries[idx] = kind
    if not entries or sorted(entries) != list(range(len(entries))):
        raise ValueError(f"VAE file {name}: expected consecutive encoder.downsamples.* blocks, found {sorted(entries)}")
    if "attn" in entries.values():
        raise ValueError(f"VAE file {name}: encoder attention blocks (attn_scales) are not supported; found some")
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for idx in range(len(entries)):
        if entries[idx] == "resample":
            temporal.append(f"encoder.downsamples.{idx}.time_conv.weight" in sd)
            levels.append([])
        else:
            levels[-1].append(idx)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"VAE file {name}: unequal residual blocks per encoder level: {[len(lv) for lv in levels]}")
    num_res_blocks = counts.pop()
    dim_mult = []
    for level in levels:
        out_ch = int(sd[f"encoder.downsamples.{level[0]}.residual.6.weight"].shape[0])
        if out_ch % base_dim:
            raise ValueError(f"VAE file {name}: level width {out_ch} is not a multiple of the base width {base_dim}")
        dim_mult.append(out_ch // base_dim)
    head = int(sd["decoder.head.0.gamma"].shape[0]) if "decoder.head.0.gamma" in sd else base_dim * dim_mult[0]
    decoder_base_dim = head // dim_mult[0]
    cfg: dict[str, Any] = {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,
        "dropout": 0.0,
        "in_channels": in_channels,
        "out_channels": int(sd["decoder.head.2.weight"].shape[0]),
    }
    if decoder_base_dim != base_dim:
        cfg["decoder_base_dim"] = decoder_base_dim
    return cfg


def _read_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        try:
            return json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"VAE config {config}: expected a JSON object, could not read it ({err})") from err
    return dict(config)


def _check_config(inferred: dict[str, Any], given: dict[str, Any], name: str) -> None:
    pairs = {"dim": "base_dim", "base_dim": "base_dim", "z_dim": "z_dim", "dim_mult": "dim_mult",
             "num_res_blocks": "num_res_blocks", "temperal_downsample": "temperal_downsample"}
    for key, ours in pairs.items():
        if key not in given:
            continue
        want = given[key]
        want = list(want) if isinstance(want, (list, tuple)) else want
        if isinstance(want, list) and ours == "temperal_downsample":
            want = [bool(v) for v in want]
        if want != inferred[ours]:
            raise ValueError(f"VAE file {name}: the config says {key}={given[key]}, the tensors say {inferred[ours]}")
    if given.get("attn_scales"):
        raise ValueError(f"VAE file {name}: attn_scales {given['attn_scales']} are not supported")


def build_wan_vae(
    sd: Mapping[str, torch.Tensor] | Checkpoint,
    name: str = "state dict",
    config: Mapping[str, Any] | str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> WanVAE:
    """A Wan-layout state dict or an open checkpoint -> :class:`WanVAE` (tensors read one at a time in ``dtype``)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    source = _Source(sd)
    sd = source.shapes
    given = _read_config(config)
    if all(k in sd for k in _DIFFUSERS_KEYS) and "encoder.conv1.weight" not in sd:
        raise ValueError(
            f"VAE file {name}: this is a diffusers-layout VAE state dict; load its model directory "
            "(config.json + weights) instead"
        )
    cfg = infer_wan_vae_config(sd, name)
    _check_config(cfg, given, name)
    mean = given.get("latent_mean", given.get("latents_mean"))
    std = given.get("latent_std", given.get("latents_std"))
    if mean is not None:
        cfg["latents_mean"] = [float(v) for v in mean]
    if std is not None:
        cfg["latents_std"] = [float(v) for v in std]
    if cfg["z_dim"] != 16 and (mean is None or std is None):
        raise ValueError(
            f"VAE file {name}: expected a Wan 2.1 VAE with 16 latent channels, found z_dim {cfg['z_dim']} "
            "(a Wan 2.2 VAE?); pass a config with latent_mean/latent_std to use it anyway"
        )
    to_wan = convert_wan_vae_to_diffusers({k: k for k in sd})  # diffusers name -> Wan name (names only)
    converted = {k: sd[v] for k, v in to_wan.items()}
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [
        f"{k} {tuple(converted[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(converted))
        if tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors, e.g. {unexpected[:4]}")
        if wrong:
            parts.append(f"wrong shapes: {wrong[:4]}")
        raise ValueError(
            f"VAE file {name}: expected {_EXPECTED} with config {cfg}; found " + "; ".join(parts)
        )
    target_dtype = dtype
    if target_dtype is None:
        target_dtype = next(iter(converted.values())).dtype
        if not target_dtype.is_floating_point:
            target_dtype = torch.float32
    state = {k: source.read(to_wan[k], target_dtype) for k in expected}  # one tensor at a time
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device)
    return WanVAE(model)


def load_wan_vae(
    path: str | Path,
    config: Mapping[str, Any] | str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> WanVAE:
    """Load a Wan 2.1 VAE file (``.pth`` / ``.safetensors``) or diffusers directory.

    ``dtype=None`` keeps the file's dtype. ``config`` may supply ``latent_mean``/``latent_std``
    and is checked against the tensors. Raises ``ValueError`` naming the file, what was
    expected and what was found when the file is not a Wan 2.1 VAE.
    """
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_dir(path, device, dtype)
    with open_vae_file(path) as ckpt:
        return build_wan_vae(ckpt, name=str(path), config=config, device=device, dtype=dtype)


def _load_diffusers_dir(path: Path, device, dtype) -> WanVAE:
    from diffusers import AutoencoderKLWan

    cfg_file = path / "config.json"
    if not cfg_file.is_file() and (path / "vae" / "config.json").is_file():
        path, cfg_file = path / "vae", path / "vae" / "config.json"
    try:
        check_regular(cfg_file)  # a FIFO would block the read
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and ModelFileError are ValueErrors
        raise ValueError(f"VAE directory {path}: expected a diffusers AutoencoderKLWan config.json ({err})") from err
    if raw.get("_class_name") != "AutoencoderKLWan":
        raise ValueError(
            f"VAE directory {path}: expected a diffusers AutoencoderKLWan, found _class_name {raw.get('_class_name')!r}"
        )
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    model = AutoencoderKLWan.from_pretrained(str(path), **kwargs)
    return WanVAE(model.to(device=device))


def wan_vae_key_names() -> list[str]:
    """Wan 2.1 VAE key names (standard layout), written from the module structure."""
    res = ["residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma",
           "residual.6.weight", "residual.6.bias"]
    names = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    for side in ("encoder", "decoder"):
        names += [f"{side}.conv1.weight", f"{side}.conv1.bias", f"{side}.head.0.gamma",
                  f"{side}.head.2.weight", f"{side}.head.2.bias"]
        for m in (0, 2):
            names += [f"{side}.middle.{m}.{r}" for r in res]
        names += [f"{side}.middle.1.{n}" for n in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")]
    for i in (0, 1, 3, 4, 6, 7, 9, 10):
        names += [f"encoder.downsamples.{i}.{r}" for r in res]
    names += [f"encoder.downsamples.{i}.shortcut.{p}" for i in (3, 6) for p in ("weight", "bias")]
    names += [f"encoder.downsamples.{i}.resample.1.{p}" for i in (2, 5, 8) for p in ("weight", "bias")]
    names += [f"encoder.downsamples.{i}.time_conv.{p}" for i in (5, 8) for p in ("weight", "bias")]
    for i in (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14):
        names += [f"decoder.upsamples.{i}.{r}" for r in res]
    names += [f"decoder.upsamples.{i}.shortcut.{p}" for i in (4,) for p in ("weight", "bias")]
    names += [f"decoder.upsamples.{i}.resample.1.{p}" for i in (3, 7, 11) for p in ("weight", "bias")]
    names += [f"decoder.upsamples.{i}.time_conv.{p}" for i in (3, 7) for p in ("weight", "bias")]
    return names


def to_wan_state_dict(model) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKLWan``'s float32 state dict under Wan's own key names (the .pth layout)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    to_wan = convert_wan_vae_to_diffusers({k: k for k in wan_vae_key_names()})  # diffusers name -> Wan name
    return {to_wan[k]: v.float().contiguous() for k, v in model.state_dict().items()}
