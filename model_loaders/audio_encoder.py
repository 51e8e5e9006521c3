"""wav2vec2 checkpoints -> a transformers ``Wav2Vec2Model`` for :mod:`..liveavatar.audio`.

Two layouts are accepted:

* a Hugging Face directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), e.g.
  ``wav2vec2-large-xlsr-53-english``; keys may carry the ``wav2vec2.`` prefix of ``Wav2Vec2ForCTC``;
* ComfyUI's single file ``wav2vec2_large_english_fp16.safetensors`` (folder ``audio_encoders``). ComfyUI's
  own ``comfy/audio_encoders/wav2vec2.py`` uses the transformers module names (``feature_extractor.conv_layers.N``,
  ``feature_projection``, ``encoder.pos_conv_embed.conv``, ``encoder.layers.N.attention.{q,k,v,out}_proj``,
  ``feed_forward.{intermediate,output}_dense``, ``layer_norm``/``final_layer_norm``) and strips an optional
  ``wav2vec2.`` prefix, so the same key map serves both. A single file has no config: it is rebuilt from
  the tensor shapes (see :func:`config_from_state_dict`).

Only the encoder is built (the CTC head is dropped): LiveAvatar reads hidden states, never logits.
The positional conv's weight norm loads from either the legacy ``weight_g``/``weight_v`` names or the
``parametrizations.weight.original0/1`` names. Files are read through ``formats.open_checkpoint``
(``.safetensors``/``.sft``/``.pth``/``.bin``), one tensor at a time straight into ``dtype``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .formats import Checkpoint, ModelFileError, open_checkpoint

_DROP_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.", "dropout_features.")
_LEGACY_WN = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_STANDARD_STRIDES = {(10, 3, 3, 3, 3, 2, 2): (5, 2, 2, 2, 2, 2, 2)}


def _key_map(keys) -> dict[str, tuple[str, str]]:
    """Encoder name -> (file key, how to read it): strip ``wav2vec2.``, drop heads inference never
    uses, rename legacy weight-norm keys; a folded weight-norm ``weight`` yields its g and v."""
    out = {}
    for raw in keys:
        key = raw[len("wav2vec2."):] if raw.startswith("wav2vec2.") else raw
        if key.startswith(_DROP_PREFIXES):
            continue
        head, _, leaf = key.rpartition(".")
        if head.endswith("pos_conv_embed.conv") and leaf in _LEGACY_WN:
            out[f"{head}.{_LEGACY_WN[leaf]}"] = (raw, "copy")
        elif head.endswith("pos_conv_embed.conv") and leaf == "weight":
            # an export with the weight norm folded in: split it back into g (norm per tap) and v
            out[f"{head}.{_LEGACY_WN['weight_g']}"] = (raw, "norm")
            out[f"{head}.{_LEGACY_WN['weight_v']}"] = (raw, "copy")
        else:
            out[key] = (raw, "copy")
    return out


def _norm_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, 1) + tuple(shape[2:])


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An in-memory state dict under the encoder's names (see :func:`_key_map`)."""
    out = {}
    for key, (raw, how) in _key_map(k for k, v in state.items() if isinstance(v, torch.Tensor)).items():
        value = state[raw]
        out[key] = value.float().norm(dim=(0, 1), keepdim=True).to(value.dtype) if how == "norm" else value
    return out


def _indices(state: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None, source: str = "?"):
    """Rebuild a ``Wav2Vec2Config`` from tensor shapes (for config-less single files).

    Shapes give widths, depths, kernels and groups. They cannot give the head count (default
    ``hidden // 64``, true for every released wav2vec2), the conv strides (the standard ones are
    assumed for the standard kernels) nor the layer-norm placement (``do_stable_layer_norm`` is taken
    to follow the feature extractor's norm: "layer" for large/xlsr models, "group" for base models).
    """
    from transformers import Wav2Vec2Config

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"{source}: not a wav2vec2 encoder checkpoint, tensor {key!r} is missing")
        return state[key]

    hidden = need("feature_projection.projection.weight").shape[0]
    convs = _indices(state, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight$")
    layers = _indices(state, r"encoder\.layers\.(\d+)\.attention\.q_proj\.weight$")
    if not convs or not layers:
        raise ValueError(f"{source}: not a wav2vec2 encoder checkpoint (no conv layers or transformer layers found)")
    conv_w = [state[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in convs]
    kernels = tuple(int(w.shape[2]) for w in conv_w)
    if kernels not in _STANDARD_STRIDES:
        raise ValueError(f"{source}: conv kernels {kernels} are not the standard wav2vec2 ones; "
                         "use a Hugging Face directory with its config.json instead")
    pos_v = need("encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    if num_heads is None:
        if hidden % 64:
            raise ValueError(f"{source}: hidden size {hidden} is not a multiple of 64; pass num_heads")
        num_heads = hidden // 64
    norm = "layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in state else "group"
    return Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads,
        intermediate_size=int(need("encoder.layers.0.feed_forward.intermediate_dense.weight").shape[0]),
        conv_dim=[int(w.shape[0]) for w in conv_w],
        conv_kernel=list(kernels),
        conv_stride=list(_STANDARD_STRIDES[kernels]),
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
        feat_extract_norm=norm,
        do_stable_layer_norm=norm == "layer",
        num_conv_pos_embeddings=int(pos_v.shape[2]),
        num_conv_pos_embedding_groups=hidden // int(pos_v.shape[1]),
    )


def build_model(config, ckpt: Checkpoint, keys: dict[str, tuple[str, str]], dtype: torch.dtype, device, source: str):
    """Instantiate on the meta device (no random init) and fill it one tensor at a time in ``dtype``."""
    from transformers import Wav2Vec2Model

    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    expected = model.state_dict()
    extra = {}
    if "masked_spec_embed" in expected and "masked_spec_embed" not in keys:  # training-only
        extra["masked_spec_embed"] = torch.zeros(config.hidden_size, dtype=dtype)
    missing = sorted(set(expected) - set(keys) - set(extra))
    unexpected = sorted(set(keys) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: does not match a wav2vec2 encoder with {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [f"{k} {_shape(ckpt, keys[k])} (expected {tuple(expected[k].shape)})"
             for k in keys if _shape(ckpt, keys[k]) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"{source}: tensor shapes do not match the wav2vec2 config: {wrong[:4]}")
    state = dict(extra)
    folded = {raw for raw, how in keys.values() if how == "norm"}
    by_raw: dict[str, list[str]] = {}
    for key, (raw, _) in keys.items():
        by_raw.setdefault(raw, []).append(key)
    for raw in ckpt.read_order(by_raw):
        if raw in folded:  # one read serves both g (its norm per tap) and v
            value = ckpt.read(raw)
            for key in by_raw[raw]:
                norm = keys[key][1] == "norm"
                state[key] = (value.float().norm(dim=(0, 1), keepdim=True) if norm else value).to(dtype)
        else:
            (key,) = by_raw[raw]
            state[key] = ckpt.read_as(raw, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def _shape(ckpt: Checkpoint, entry: tuple[str, str]) -> tuple[int, ...]:
    raw, how = entry
    return _norm_shape(ckpt.shape(raw)) if how == "norm" else tuple(ckpt.shape(raw))


def _open(path: Path) -> Checkpoint:
    try:
        return open_checkpoint(path)
    except ModelFileError as exc:
        raise ModelFileError(f"{exc} (expected a wav2vec2 audio encoder)") from None


def load_audio_encoder(path: str | Path, *, dtype: torch.dtype | None = None, device="cpu",
                       num_heads: int | None = None):
    """Load a wav2vec2 encoder from a HF directory or a single checkpoint file.

    ``dtype`` None keeps the file's floating dtype. ``num_heads`` only matters for config-less files
    whose head count is not ``hidden // 64``.
    """
    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{path}: a wav2vec2 directory needs config.json")
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin found")
        from transformers import Wav2Vec2Config

        raw = json.loads(cfg_file.read_text())
        if raw.get("model_type") != "wav2vec2":
            raise ValueError(f"{cfg_file}: expected model_type 'wav2vec2', found {raw.get('model_type')!r}")
        config = Wav2Vec2Config.from_dict(raw)
    elif path.is_file():
        weights, config = path, None
    else:
        raise ValueError(f"wav2vec2 checkpoint {path} does not exist")
    with _open(weights) as ckpt:
        source = str(weights)
        keys = _key_map(ckpt.keys())
        if config is None:
            shapes = {k: torch.empty(_shape(ckpt, e), device="meta") for k, e in keys.items()}
            config = config_from_state_dict(shapes, num_heads=num_heads, source=source)
        if dtype is None:
            dtype = next((ckpt.dtype(raw) for raw, _ in keys.values() if ckpt.dtype(raw).is_floating_point), torch.float32)
        return build_model(config, ckpt, keys, dtype, device, source)


__all__ = ["load_audio_encoder", "config_from_state_dict", "normalize_keys"]
