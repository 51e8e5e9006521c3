"""Prompt -> umT5 text context, as upstream's ``T5EncoderModel.__call__`` produces it.

The prompt is cleaned like Wan's tokenizer wrapper (ftfy when installed, HTML unescaped twice,
whitespace collapsed), tokenised with ``</s>`` appended and padded to ``text_len`` (512), and encoded
with the padding masked. The DiT gets only the real tokens' rows (``[real_tokens, dim]``); it pads them
with zeros to ``text_len`` itself. Upstream silently truncates long prompts; we refuse them instead,
because a truncated prompt loses its ``</s>`` and its tail without telling anyone.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TextConfig:
    """Tokenisation of the prompt (upstream: ``text_len`` 512, ``clean='whitespace'``)."""

    text_len: int = 512  # tokens the DiT's text cross-attention sees, </s> included


DEFAULT_TEXT = TextConfig()


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix mojibake (if ftfy is installed), unescape HTML, collapse spaces."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs broken encodings; plain prompts are unaffected
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(directory: str | Path):
    """The umT5 tokenizer from a local directory (e.g. ``google/umt5-xxl``'s files); nothing is downloaded."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"tokenizer directory {directory} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - one clear message naming the folder
        raise ValueError(f"cannot load a tokenizer from {directory}: {exc}") from exc


def tokenize(tokenizer, prompt: str, config: TextConfig = DEFAULT_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[1, text_len]`` int64; a prompt that does not fit is refused."""
    text = clean_prompt(prompt)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > config.text_len:
        raise ValueError(
            f"the prompt is {len(ids)} tokens long; the text encoder takes at most {config.text_len} "
            f"(end-of-text token included). Shorten it by about {len(ids) - config.text_len} tokens."
        )
    batch = tokenizer(text, add_special_tokens=True, padding="max_length", max_length=config.text_len,
                      truncation=False, return_tensors="pt")
    return batch["input_ids"].to(torch.int64), batch["attention_mask"].to(torch.int64)


@torch.inference_mode()
def encode_text(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """umT5 encoder output for one prompt, trimmed to its real tokens: ``[mask.sum(), dim]``.

    Padding is masked out of the attention (so the real rows do not depend on ``text_len``).
    """
    if input_ids.dim() == 1:
        input_ids, attention_mask = input_ids[None], attention_mask[None]
    if input_ids.shape[0] != 1 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"encode_text takes one prompt: ids {tuple(input_ids.shape)}, mask {tuple(attention_mask.shape)}"
        )
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    return out[0, : int(attention_mask.sum())]


def encode_prompt(model: torch.nn.Module, tokenizer, prompt: str, config: TextConfig = DEFAULT_TEXT) -> torch.Tensor:
    """Clean, tokenise and encode ``prompt``: the DiT's text context ``[real_tokens, dim]``."""
    return encode_text(model, *tokenize(tokenizer, prompt, config))


__all__ = ["DEFAULT_TEXT", "TextConfig", "clean_prompt", "encode_prompt", "encode_text", "load_tokenizer", "tokenize"]
