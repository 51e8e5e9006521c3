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


# -- precision, fp8 storage, one reader ------------------------------------------------------------


def _tiny_hf_state(dtype=torch.float16, seed=1, dim=64, vocab=512):
    from liveavatar_pack.liveavatar.tiny import tiny_text_encoder

    model = tiny_text_encoder(seed=seed, dim=dim, vocab=vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    return model, {k: v.to(dtype) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def _ids(vocab=512, n=12):
    ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(5))
    mask = (torch.arange(16) < n).long()[None]
    return ids * mask, mask


def _bytes(module: torch.nn.Module) -> int:
    return sum({id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}.values())


def test_sft_and_pth_files_load_through_the_checkpoint_reader(tmp_path):
    """ComfyUI lists .sft files; every suffix goes through formats.open_checkpoint."""
    _, state = _tiny_hf_state(torch.float32)
    save_file(state, str(tmp_path / "umt5.safetensors"))
    save_file(state, str(tmp_path / "umt5.sft"))
    torch.save(state, tmp_path / "umt5.pth")
    ref = load_text_encoder(tmp_path / "umt5.safetensors")
    ids, mask = _ids()
    want = encode_text(ref, ids, mask)
    for name in ("umt5.sft", "umt5.pth"):
        assert torch.equal(encode_text(load_text_encoder(tmp_path / name), ids, mask), want), name
    (tmp_path / "cut.sft").write_bytes((tmp_path / "umt5.sft").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.sft.*truncated"):
        load_text_encoder(tmp_path / "cut.sft")


def _fp8_scaled(state: dict) -> dict:
    """ComfyUI's umt5_xxl_fp8_e4m3fn_scaled layout: fp8 Linear weights + scale_weight, the rest fp16."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.endswith((".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")):
            scale = value.float().abs().max() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            out[key] = value.half()
    return out


def test_fp8_scaled_file_keeps_fp8_weights(tmp_path):
    """Linear weights stay fp8 (dequantised per layer at call time): same output, less memory."""
    from liveavatar_pack.model_loaders.fp8 import FP8Linear

    _, state = _tiny_hf_state(torch.float32)
    fp8 = _fp8_scaled(state)
    save_file(fp8, str(tmp_path / "umt5_fp8.safetensors"))
    deq = {k: (v.float() * fp8[k[: -len("weight")] + "scale_weight"]) if v.dtype == torch.float8_e4m3fn else v.float()
           for k, v in fp8.items() if k != "scaled_fp8" and not k.endswith("scale_weight")}
    save_file(deq, str(tmp_path / "umt5_deq.safetensors"))
    ids, mask = _ids()
    for dtype in (torch.float32, torch.bfloat16):
        model = load_text_encoder(tmp_path / "umt5_fp8.safetensors", dtype=dtype)
        linears = [m for m in model.modules() if isinstance(m, FP8Linear)]
        assert len(linears) == 7 * model.config.num_layers
        assert all(m.weight.dtype == torch.float8_e4m3fn and not m.use_scaled_mm for m in linears)  # weight-only fp8
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        dense = load_text_encoder(tmp_path / "umt5_deq.safetensors", dtype=dtype)
        assert _bytes(model) < 0.7 * _bytes(dense)
        got, want = encode_text(model, ids, mask), encode_text(dense, ids, mask)
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(got, want)
        else:  # bf16: the activations stay bf16 (no fp8 cast before wo); dequantisation order differs by rounding
            assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()


def test_fp8_precision_quantises_a_higher_precision_file(tmp_path):
    from liveavatar_pack.model_loaders.fp8 import FP8Linear

    _, state = _tiny_hf_state(torch.float16)
    save_file(state, str(tmp_path / "umt5_fp16.safetensors"))
    ids, mask = _ids()
    ref = encode_text(load_text_encoder(tmp_path / "umt5_fp16.safetensors", dtype=torch.float32), ids, mask)
    model = load_text_encoder(tmp_path / "umt5_fp16.safetensors", dtype=torch.bfloat16, fp8=True)
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 7 * model.config.num_layers
    got = encode_text(model, ids, mask).float()
    assert (got - ref).abs().max() <= 0.1 * ref.abs().max()  # fp8 e4m3 weights: a few % on a random model


def test_load_converts_while_reading(tmp_path, monkeypatch):
    """No tensor of the file is held whole in another dtype: conversion happens chunk by chunk."""
    from liveavatar_pack.model_loaders import formats

    _, state = _tiny_hf_state(torch.float16, dim=64, vocab=4096)
    save_file(state, str(tmp_path / "umt5.safetensors"))
    monkeypatch.setattr(formats, "READ_CHUNK", 4096)
    reads = []
    real_read = formats.Checkpoint.read
    monkeypatch.setattr(formats.Checkpoint, "read", lambda self, key, out=None: reads.append(key) or real_read(self, key, out))
    model = load_text_encoder(tmp_path / "umt5.safetensors", dtype=torch.bfloat16)
    assert reads == []  # every fp16 tensor went through read_as (chunked), none was read whole
    assert model.shared.weight.dtype == torch.bfloat16
    assert torch.equal(model.shared.weight, state["shared.weight"].to(torch.bfloat16))


@pytest.mark.golden
def test_bf16_and_fp16_parity_cost(t5_dir):
    """The README's figures: max |err| / max |golden| of the padded encoder output per compute dtype."""
    gold = load_file(str(t5_dir / "golden.safetensors"))
    errs = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = load_text_encoder(t5_dir / "t5_encoder.safetensors", dtype=dtype)
        with torch.no_grad():
            out = model(input_ids=gold["input_ids"], attention_mask=gold["attention_mask"]).last_hidden_state
        ref = gold["encoder_out_padded"]
        errs[dtype] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert errs[torch.float32] <= 1e-5
    assert errs[torch.bfloat16] <= 2e-2, errs  # measured 1.05e-2
    assert errs[torch.float16] <= 4e-3, errs  # measured 1.3e-3


def test_planner_text_bytes_equal_what_the_loader_allocates(tmp_path):
    """EncoderSizes (the planner's text term) == bytes of the loaded module, per precision."""
    from liveavatar_pack.liveavatar.tiny import tiny_audio_encoder
    from liveavatar_pack.model_loaders.planner import EncoderSizes

    model, state = _tiny_hf_state(torch.float16)
    save_file(state, str(tmp_path / "umt5.safetensors"))
    save_file(_fp8_scaled(state), str(tmp_path / "umt5_fp8.safetensors"))
    sizes = EncoderSizes.of_models(model, tiny_audio_encoder())
    cases = [("fp32", "umt5.safetensors", torch.float32, None), ("bf16", "umt5.safetensors", torch.bfloat16, None),
             ("fp16", "umt5.safetensors", torch.float16, None), ("fp8", "umt5.safetensors", torch.bfloat16, True),
             ("fp8", "umt5_fp8.safetensors", torch.bfloat16, None)]
    for precision, name, dtype, fp8 in cases:
        loaded = load_text_encoder(tmp_path / name, dtype=dtype, fp8=fp8)
        assert sizes.with_precision(text=precision).text_total == _bytes(loaded), (precision, name)


def test_full_size_encoder_counts_are_the_real_configs():
    """The planner's default sizes are umT5-XXL and wav2vec2-large counted on the meta device."""
    from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    from liveavatar_pack.model_loaders.planner import GiB, EncoderSizes

    with torch.device("meta"):
        text = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                           num_heads=64, relative_attention_num_buckets=32,
                                           feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        audio = Wav2Vec2Model(Wav2Vec2Config(  # wav2vec2-large-xlsr-53-english
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=True,
            feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=128,
            num_conv_pos_embedding_groups=16))
    counted = EncoderSizes.of_models(text, audio)
    assert counted == EncoderSizes(), (counted, EncoderSizes())
    # the figures the README states
    assert round(counted.with_precision(text="fp32").text_total / GiB, 2) == 21.16
    assert round(counted.with_precision(text="bf16").text_total / GiB, 2) == 10.58
    assert round(counted.with_precision(text="fp8").text_total / GiB, 2) == 6.27
