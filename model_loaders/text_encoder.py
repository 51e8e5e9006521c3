"""umT5 encoder checkpoints -> a transformers ``UMT5EncoderModel`` for :mod:`..liveavatar.text`.

Layouts accepted (detected from the keys):

* Wan's own (``models_t5_umt5-xxl-enc-bf16.pth``, golden ``t5/t5_encoder.safetensors``):
  ``token_embedding``, ``blocks.N.{norm1,attn.{q,k,v,o},norm2,ffn.{gate.0,fc1,fc2},pos_embedding.embedding}``, ``norm``;
* Hugging Face / ComfyUI (``umt5_xxl_fp16.safetensors``, ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``):
  ``shared`` or ``encoder.embed_tokens``, ``encoder.block.N.layer.{0,1}...``, ``encoder.final_layer_norm``.
  ComfyUI's extra ``spiece_model`` (its tokenizer) is ignored; ``scaled_fp8`` files are dequantised
  (``weight * scale_weight``) to ``dtype``.

The ``UMT5Config`` is rebuilt from the tensor shapes (vocab, width, heads from the per-layer relative
bias, head size, ffn, layers, buckets), with umT5's gated tanh-GELU feed-forward.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

_WAN_MAP = [
    (r"token_embedding\.weight", "shared.weight"),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
]
_IGNORED = ("spiece_model", "scaled_fp8")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or a ``.pth/.pt/.bin`` (``torch.load(weights_only=True)``) file."""
    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read text encoder weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _dequantize(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fold ComfyUI ``scale_weight`` tensors into their fp8 weights and cast everything to ``dtype``."""
    out = {}
    for key, value in state.items():
        if key in _IGNORED or key.endswith((".scale_weight", ".scale_input")) or not isinstance(value, torch.Tensor):
            continue
        scale = state.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            value = value.to(torch.float32) * scale.to(torch.float32)
        out[key] = value.to(dtype)
    return out


def to_hf_keys(state: dict[str, torch.Tensor], source: str = "?") -> dict[str, torch.Tensor]:
    """Any supported layout -> ``UMT5EncoderModel`` names (``shared`` and ``encoder.embed_tokens`` both set)."""
    if "token_embedding.weight" in state:
        if "pos_embedding.embedding.weight" in state:
            raise ValueError(f"{source}: a T5 with one shared position bias, not umT5 (per-layer biases expected)")
        out = {}
        for key, value in state.items():
            for pattern, repl in _WAN_MAP:
                if re.fullmatch(pattern, key):
                    out[re.sub(pattern, repl, key)] = value
                    break
            else:
                if key.startswith("decoder.") or key.startswith("head."):
                    continue  # a full encoder-decoder file: the decoder is unused
                raise ValueError(f"{source}: unexpected tensor {key!r} in a Wan umT5 encoder checkpoint")
    elif "shared.weight" in state or "encoder.embed_tokens.weight" in state:
        out = {k: v for k, v in state.items() if k.startswith("encoder.") or k == "shared.weight"}
    else:
        raise ValueError(
            f"{source}: not a umT5 encoder checkpoint (no token_embedding / shared / encoder.embed_tokens)"
        )
    embed = out.get("shared.weight", out.get("encoder.embed_tokens.weight"))
    out["shared.weight"] = out["encoder.embed_tokens.weight"] = embed
    return out


def config_from_state_dict(state: dict[str, torch.Tensor], source: str = "?"):
    """A ``UMT5Config`` whose sizes are read off HF-named tensors."""
    from transformers import UMT5Config

    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"{source}: umT5 encoder blocks missing or not numbered 0..N-1 (found {blocks[:8]}...)")
    prefix = "encoder.block.0.layer."
    try:
        bias = state[prefix + "0.SelfAttention.relative_attention_bias.weight"]
        q = state[prefix + "0.SelfAttention.q.weight"]
        wi = state[prefix + "1.DenseReluDense.wi_0.weight"]
    except KeyError as exc:
        raise ValueError(
            f"{source}: umT5 encoder tensor {exc.args[0]!r} is missing (a gated-GELU umT5 expected)"
        ) from exc
    vocab, d_model = state["shared.weight"].shape
    heads = int(bias.shape[1])
    return UMT5Config(
        vocab_size=int(vocab), d_model=int(d_model), d_kv=int(q.shape[0]) // heads, d_ff=int(wi.shape[0]),
        num_layers=len(blocks), num_heads=heads, relative_attention_num_buckets=int(bias.shape[0]),
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )


def _file_dtype(raw: dict) -> torch.dtype:
    """The checkpoint's compute dtype: bfloat16 for fp8 files, else the embedding's dtype."""
    tensors = [v for k, v in raw.items() if isinstance(v, torch.Tensor) and k not in _IGNORED]
    if any(v.is_floating_point() and v.dtype.itemsize == 1 for v in tensors):
        return torch.bfloat16
    for key in ("token_embedding.weight", "shared.weight", "encoder.embed_tokens.weight"):
        if key in raw and raw[key].is_floating_point():
            return raw[key].dtype
    return torch.float32


def load_text_encoder(path: str | Path, *, dtype: torch.dtype | None = None, device="cpu"):
    """Load a umT5 encoder file (Wan ``.pth``/safetensors or ComfyUI/HF safetensors).

    ``dtype`` None keeps the file's floating dtype (fp8 files become bfloat16).
    """
    from transformers import UMT5EncoderModel

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text encoder checkpoint {path} does not exist")
    raw = read_state_dict(path)
    if dtype is None:
        dtype = _file_dtype(raw)
    state = to_hf_keys(_dequantize(raw, dtype), str(path))
    config = config_from_state_dict(state, str(path))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: does not match a {config.num_layers}-layer umT5 encoder: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: tensor shapes do not match the umT5 config: {exc}") from exc
    model.encoder.embed_tokens = model.shared  # keep the tie that assign=True broke
    return model.to(device).eval().requires_grad_(False)


__all__ = ["load_text_encoder", "to_hf_keys", "config_from_state_dict", "read_state_dict"]
