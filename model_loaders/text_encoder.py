"""umT5 encoder checkpoints -> a transformers ``UMT5EncoderModel`` for :mod:`..liveavatar.text`.

Layouts accepted (detected from the keys):

* Wan's own (``models_t5_umt5-xxl-enc-bf16.pth``, golden ``t5/t5_encoder.safetensors``):
  ``token_embedding``, ``blocks.N.{norm1,attn.{q,k,v,o},norm2,ffn.{gate.0,fc1,fc2},pos_embedding.embedding}``, ``norm``;
* Hugging Face / ComfyUI (``umt5_xxl_fp16.safetensors``, ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``):
  ``shared`` or ``encoder.embed_tokens``, ``encoder.block.N.layer.{0,1}...``, ``encoder.final_layer_norm``.
  ComfyUI's extra ``spiece_model`` (its tokenizer) is ignored; the Linear weights of ``scaled_fp8``
  files stay fp8 (``FP8Linear``: ``weight * scale_weight`` per layer at call time).

Every file is read through ``formats.open_checkpoint`` (one tensor at a time, straight into the
target dtype), so ``.sft`` and the other suffixes ComfyUI lists work like ``.safetensors``.

The ``UMT5Config`` is rebuilt from the tensor shapes (vocab, width, heads from the per-layer relative
bias, head size, ffn, layers, buckets), with umT5's gated tanh-GELU feed-forward.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from .formats import Checkpoint, open_checkpoint
from .fp8 import FP8_DTYPE, FP8Linear, _set_submodule, dequantize_fp8, quantize_fp8_into

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


def _file_dtype(ckpt: Checkpoint, names: dict[str, str]) -> torch.dtype:
    """The checkpoint's compute dtype: bfloat16 for fp8 files, else the embedding's dtype."""
    if any(ckpt.dtype(raw).is_floating_point and ckpt.dtype(raw).itemsize == 1 or ckpt.fp8_storage(raw)
           for raw in names.values()):
        return torch.bfloat16
    for key in ("token_embedding.weight", "shared.weight", "encoder.embed_tokens.weight"):
        if key in names and ckpt.dtype(names[key]).is_floating_point:
            return ckpt.dtype(names[key])
    return torch.float32


def _fp8_ffn_class():
    """umT5's gated FFN for an fp8 ``wo``: the stock forward casts the activations to ``wo.weight``'s
    dtype (T5's float32-``wo`` rule), which with fp8 weights would quantise them. Same math otherwise."""
    global _FP8_FFN
    if _FP8_FFN is None:
        from transformers.models.umt5.modeling_umt5 import UMT5DenseGatedActDense

        class FP8GatedFFN(UMT5DenseGatedActDense):
            def forward(self, hidden_states):
                hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
                return self.wo(self.dropout(hidden))

        _FP8_FFN = FP8GatedFFN
    return _FP8_FFN


_FP8_FFN = None


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def load_text_encoder(path: str | Path, *, dtype: torch.dtype | None = None, device="cpu", fp8: bool | None = None):
    """Load a umT5 encoder file (Wan ``.pth``/safetensors or ComfyUI/HF safetensors, ``.sft`` too).

    ``dtype`` is the compute dtype; None keeps the file's floating dtype (fp8 files compute in
    bfloat16). ``fp8``: None keeps the Linear weights a file stores as fp8 in fp8 (``FP8Linear``,
    dequantised per layer at call time: half the memory of bf16, the same values as a load-time
    dequantisation); True also quantises a higher-precision file's Linear weights (per tensor);
    False dequantises everything to ``dtype``. Tensors are read one at a time straight into
    their final dtype, so the load peak stays ~1x of the model's resident size.
    """
    from transformers import UMT5EncoderModel

    path = Path(path)
    if not path.exists():
        raise ValueError(f"text encoder checkpoint {path} does not exist")
    with open_checkpoint(path) as ckpt:
        names = {n: raw for n, raw in ckpt.model_keys().items() if n not in _IGNORED}
        if dtype is None:
            dtype = _file_dtype(ckpt, names)
        hf_names = to_hf_keys({n: n for n in names}, str(path))  # HF name -> file name (no data read)
        shapes = {hf: torch.empty(ckpt.shape(names[n]), device="meta") for hf, n in hf_names.items()}
        config = config_from_state_dict(shapes, str(path))
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: does not match a {config.num_layers}-layer umT5 encoder: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        wrong = [f"{k} {tuple(shapes[k].shape)} (expected {tuple(expected[k].shape)})"
                 for k in expected if tuple(shapes[k].shape) != tuple(expected[k].shape)]
        if wrong:
            raise ValueError(f"{path}: tensor shapes do not match the umT5 config: {wrong[:4]}")
        fp8_layers = {}
        for layer in _linear_names(model):
            raw = names[hf_names[layer + ".weight"]]
            stored = ckpt.fp8_storage(raw)
            if (fp8 is None and stored) or fp8:
                fp8_layers[layer] = raw
        state, done = {}, {}
        for key in ckpt.read_order({names[hf_names[k]] for k in expected} - set(fp8_layers.values())):
            done[key] = _read_dequantized(ckpt, key, dtype)
        for hf in expected:
            raw = names[hf_names[hf]]
            if raw in done:
                state[hf] = done[raw]
        model.load_state_dict(state, strict=False, assign=True)
        for layer, raw in fp8_layers.items():
            if ckpt.fp8_storage(raw):
                weight, scale = ckpt.read_fp8(raw)
            else:
                weight = torch.empty(ckpt.shape(raw), dtype=FP8_DTYPE)
                scale = quantize_fp8_into(ckpt.read_as(raw, torch.float32), weight)
            linear = FP8Linear.from_quantized(weight, scale, None, compute_dtype=dtype)
            # weight-only: T5's activations have outliers that a per-tensor fp8 input scale (the
            # _scaled_mm path) would crush, and the encoder runs once per prompt
            linear.use_scaled_mm = False
            _set_submodule(model, layer, linear)
    for block in model.encoder.block:
        ffn = block.layer[1].DenseReluDense
        if isinstance(ffn.wo, FP8Linear):
            ffn.__class__ = _fp8_ffn_class()
    model.encoder.embed_tokens = model.shared  # keep the tie that assign=True broke
    return model.to(device).eval().requires_grad_(False)


def _read_dequantized(ckpt: Checkpoint, raw: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor in ``dtype``: fp8 ones multiplied by their scale, others converted while read."""
    if ckpt.fp8_storage(raw):
        return dequantize_fp8(*ckpt.read_fp8(raw), dtype)
    return ckpt.read_as(raw, dtype)


__all__ = ["load_text_encoder", "to_hf_keys", "config_from_state_dict"]
