"""Tiny random-weight models with the real architecture, for tests, demos and CPU benchmarks.

Every parameter (including the ones upstream zero-initialises) gets seeded random
values, so every path of the model contributes to the output.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import TINY, DiTConfig
from .transformer import LiveAvatarTransformer

# The latent size (rows, columns) of the unit tests and CPU checks that drive the DiT directly:
# non-square with an odd number of token columns (4 x 5 tokens per latent frame), so a swap of
# rows and columns anywhere (a RoPE grid, a cache shape, a patchify) changes a result or a shape,
# where a square size would hide it. FramePack's 8x-pooled grid stays non-empty (10 // 8 = 1).
TINY_LATENT_HW = (8, 10)  # 64 x 80 pixels


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Fill every parameter with N(0, std^2) from a generator seeded ``seed`` (norm weights around 1)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, param in module.named_parameters():
        values = torch.randn(param.shape, generator=gen) * std
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
            values += 1.0
        param.copy_(values.to(param.dtype))
    return module


def tiny_transformer(seed: int = 0, cfg: DiTConfig = TINY) -> LiveAvatarTransformer:
    """A random LiveAvatar DiT of config ``cfg`` (the TINY preset by default), in eval mode."""
    return randomize_(LiveAvatarTransformer(cfg), seed).eval()


def tiny_vae(seed: int = 0, base_dim: int = 4):
    """A random Wan 2.1-structure VAE (z 16, stride 4x8x8) with Wan's latent mean/std."""
    from diffusers import AutoencoderKLWan

    from .vae import WanVAE

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             attn_scales=[], temperal_downsample=[False, True, True])
    return WanVAE(model.eval())


def tiny_audio_encoder(seed: int = 0, hidden: int = 16):
    """A random wav2vec2 with the real large-xlsr structure (24 layers -> 25 hidden states), shrunk."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=24, num_attention_heads=2, intermediate_size=2 * hidden,
        conv_dim=(hidden,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, feat_extract_norm="layer",
        do_stable_layer_norm=True, vocab_size=32,
    )
    return Wav2Vec2Model(config).eval()


def tiny_text_encoder(seed: int = 0, dim: int = 32, vocab: int = 256):
    """A random umT5 encoder (gated-gelu, per-layer relative position bias), shrunk."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab, d_model=dim, d_kv=dim // 4, d_ff=2 * dim, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return UMT5EncoderModel(config).eval()


def byte_tokens(prompt: str, vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids for tiny text encoders that have no tokenizer: UTF-8 bytes folded into the vocab, then EOS (1)."""
    ids = [2 + b % (vocab - 2) for b in prompt.encode("utf-8")][: length - 1] + [1]
    padded = torch.zeros(1, length, dtype=torch.int64)
    padded[0, : len(ids)] = torch.tensor(ids)
    mask = (torch.arange(length) < len(ids)).to(torch.int64)[None]
    return padded, mask


def save_tiny_tokenizer(directory, vocab: int = 256) -> None:
    """Write a small umT5-style tokenizer (unigram over characters; pad 0, eos 1, unk 2) as tokenizer.json.

    Real runs use the ``google/umt5-xxl`` tokenizer directory; this one lets tests and
    demos exercise the same directory-loading path with a tiny text encoder.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + list("äöüéèàçñ")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars[: vocab - 4]] + [("▁", -1.0)]
    tok = Tokenizer(models.Unigram(pieces[:vocab], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
