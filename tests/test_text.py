"""umT5 text encoder: Wan/ComfyUI key layouts, golden parity, tokenisation rules."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import golden_subdir
from liveavatar_pack.liveavatar.text import (
    TextConfig,
    clean_prompt,
    encode_prompt,
    encode_text,
    load_tokenizer,
    tokenize,
)
from liveavatar_pack.model_loaders.text_encoder import load_text_encoder, to_hf_keys


def _tol(golden: torch.Tensor) -> float:
    return 1e-5 * max(1.0, golden.abs().max().item())


@pytest.fixture(scope="module")
def t5_dir(golden_dir):
    return golden_subdir(golden_dir, "t5")


@pytest.fixture(scope="module")
def wan_encoder(t5_dir):
    return load_text_encoder(t5_dir / "t5_encoder.safetensors")


@pytest.mark.golden
def test_config_read_from_shapes(t5_dir, wan_encoder):
    cfg = json.loads((t5_dir / "config.json").read_text())
    c = wan_encoder.config
    assert (c.vocab_size, c.d_model, c.num_heads, c.num_layers) == (
        cfg["vocab_size"], cfg["dim"], cfg["num_heads"], cfg["encoder_layers"])
    assert c.d_kv * c.num_heads == cfg["dim_attn"] and c.d_ff == cfg["dim_ffn"]
    assert c.relative_attention_num_buckets == cfg["num_buckets"]


@pytest.mark.golden
def test_encoder_matches_golden(t5_dir, wan_encoder):
    gold = load_file(str(t5_dir / "golden.safetensors"))
    with torch.no_grad():
        padded = wan_encoder(input_ids=gold["input_ids"], attention_mask=gold["attention_mask"]).last_hidden_state
    assert padded.shape == gold["encoder_out_padded"].shape
    err = (padded - gold["encoder_out_padded"]).abs().max().item()
    assert err <= _tol(gold["encoder_out_padded"]), err
    context = encode_text(wan_encoder, gold["input_ids"], gold["attention_mask"])
    assert context.shape == gold["context_trimmed"].shape
    err = (context - gold["context_trimmed"]).abs().max().item()
    assert err <= _tol(gold["context_trimmed"]), err


@pytest.mark.golden
def test_comfyui_layouts_load_the_same_model(t5_dir, wan_encoder, tmp_path):
    gold = load_file(str(t5_dir / "golden.safetensors"))
    hf = to_hf_keys(load_file(str(t5_dir / "t5_encoder.safetensors")))
    ref = encode_text(wan_encoder, gold["input_ids"], gold["attention_mask"])

    comfy = {k: v.clone() for k, v in hf.items() if k != "encoder.embed_tokens.weight"}
    comfy["spiece_model"] = torch.arange(16, dtype=torch.uint8)  # ComfyUI stores its tokenizer here
    save_file(comfy, str(tmp_path / "umt5_fp32.safetensors"))
    model = load_text_encoder(tmp_path / "umt5_fp32.safetensors")
    assert torch.equal(encode_text(model, gold["input_ids"], gold["attention_mask"]), ref)

    # scaled fp8 (umt5_xxl_fp8_e4m3fn_scaled): weight_fp8 * scale_weight, dequantised on load
    fp8, deq = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in comfy.items():
        if key.endswith((".SelfAttention.q.weight", ".wi_0.weight")):
            scale = value.abs().max() / 448.0
            fp8[key] = (value / scale).to(torch.float8_e4m3fn)
            fp8[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            deq[key] = fp8[key].float() * scale
        else:
            fp8[key] = deq[key] = value
    save_file(fp8, str(tmp_path / "umt5_fp8.safetensors"))
    save_file({k: v for k, v in deq.items() if k != "spiece_model"}, str(tmp_path / "umt5_deq.safetensors"))
    a = load_text_encoder(tmp_path / "umt5_fp8.safetensors", dtype=torch.float32)
    b = load_text_encoder(tmp_path / "umt5_deq.safetensors")
    assert torch.equal(encode_text(a, gold["input_ids"], gold["attention_mask"]),
                       encode_text(b, gold["input_ids"], gold["attention_mask"]))
    assert load_text_encoder(tmp_path / "umt5_fp8.safetensors").dtype == torch.bfloat16


@pytest.mark.golden
def test_bad_checkpoint_names_the_file(t5_dir, tmp_path):
    state = load_file(str(t5_dir / "t5_encoder.safetensors"))
    state.pop("blocks.1.ffn.fc2.weight")
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_text_encoder(tmp_path / "broken.safetensors")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a umT5"):
        load_text_encoder(tmp_path / "other.safetensors")


def _tiny_tokenizer_dir(path, words):
    """A word-level tokenizer that appends </s> like umT5's, saved as a local HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


def test_tokenize_pads_to_text_len_and_refuses_long_prompts(tmp_path):
    tok = load_tokenizer(_tiny_tokenizer_dir(tmp_path / "tok", ["a", "woman", "talks", "&"]))
    ids, mask = tokenize(tok, "  a   woman\n talks ", TextConfig(text_len=8))
    assert ids.tolist() == [[3, 4, 5, 1, 0, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    assert tokenize(tok, "a woman")[0].shape == (1, 512)  # upstream's text_len by default
    tokenize(tok, " ".join(["a"] * 7), TextConfig(text_len=8))  # 7 words + </s> fit exactly
    with pytest.raises(ValueError, match="8 tokens long.*at most 7"):
        tokenize(tok, " ".join(["a"] * 7), TextConfig(text_len=7))
    assert clean_prompt(" a &amp;amp;  woman ") == "a & woman"
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.golden
def test_prompt_end_to_end_does_not_depend_on_padding(t5_dir, wan_encoder, tmp_path):
    tok = load_tokenizer(_tiny_tokenizer_dir(tmp_path / "tok", ["a", "woman", "talks"]))
    context = encode_prompt(wan_encoder, tok, "a woman talks", TextConfig(text_len=16))
    assert context.shape == (4, wan_encoder.config.d_model)
    longer = encode_prompt(wan_encoder, tok, "a woman talks", TextConfig(text_len=64))
    assert (context - longer).abs().max().item() <= _tol(context)
