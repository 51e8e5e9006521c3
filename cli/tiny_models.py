"""``python -m liveavatar tiny-models --out DIR``: tiny random-weight model files in the real formats.

Written into ComfyUI's folder layout under DIR, with the file names the example workflows use,
so every example runs unchanged on a CPU (with meaningless output: random weights):

=====================================================  =====================================================
``diffusion_models/wan2.2_s2v_14B_bf16.safetensors``   ComfyUI single file, ``model.diffusion_model.`` keys, bf16
``diffusion_models/wan2.2_s2v_14B_fp8_scaled.safetensors``  the same with fp8 e4m3 weights + ``scale_weight``
``diffusion_models/Wan2.2-S2V-14B-Q8_0.gguf``, ``-Q4_0.gguf``  GGUF in ComfyUI-GGUF's layout (blocks' Linears
                                                       quantized, 5-D Conv3d weights F32; ``gguf_write``)
``loras/liveavatar.safetensors``                       PEFT LoRA (``base_model.model.<module>.lora_A/B``)
``vae/wan_2.1_vae.safetensors``                        Wan 2.1 VAE, Wan's key names (base width 4, not 96)
``text_encoders/umt5_xxl_fp16.safetensors``            umT5 encoder, Hugging Face key names, fp16
``text_encoders/umt5-xxl/``                            a sentencepiece tokenizer (T5Tokenizer files) of the
                                                       tiny vocabulary, trained here on a few sentences
``audio_encoders/wav2vec2_large_english_fp16.safetensors``  wav2vec2 (large-xlsr structure, 24 layers), fp16
``input/liveavatar_example.png``, ``input/liveavatar_example.wav``  synthetic face and speech
=====================================================  =====================================================

When DIR is a ComfyUI installation's ``models/`` folder, the example inputs go to ComfyUI's
``input/`` folder beside it instead (where 'Load Image' / 'Load Audio' list files). Files are
written with the user's umask (safetensors' own ``save_file`` creates them 0600, unreadable by a
ComfyUI running as another user).

The tiny DiT has dim 128 (one 128-wide head, Wan's head size), so its configuration is read off
the tensor shapes like the real file's. Core ComfyUI loaders (``Load CLIP`` type wan,
``AudioEncoderLoader``) hard-code the full umT5-XXL / wav2vec2-large sizes and cannot load tiny
files; the example that uses them needs the real weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

DIT_FILES = ("wan2.2_s2v_14B_bf16.safetensors", "wan2.2_s2v_14B_fp8_scaled.safetensors")
GGUF_TYPES = ("Q8_0", "Q4_0")  # the tiny dim (128) is not a multiple of the K-quants' 256-value blocks
GGUF_FILES = tuple(f"Wan2.2-S2V-14B-{q}.gguf" for q in GGUF_TYPES)
LORA_FILE = "liveavatar.safetensors"
VAE_FILE = "wan_2.1_vae.safetensors"
TEXT_FILE = "umt5_xxl_fp16.safetensors"
TOKENIZER_DIR = "umt5-xxl"
AUDIO_FILE = "wav2vec2_large_english_fp16.safetensors"
IMAGE_FILE = "liveavatar_example.png"
SPEECH_FILE = "liveavatar_example.wav"
SPEECH_SECONDS = 1.6  # one 48-frame clip: quick on a CPU
PREFIX = "model.diffusion_model."

TEXT_DIM, AUDIO_DIM, VOCAB = 32, 64, 256


def tiny_dit_config():
    from ..liveavatar.config import DiTConfig

    return DiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=TEXT_DIM, audio_dim=AUDIO_DIM,
                     audio_inject_layers=(0, 1))


def _save(sd: dict, path: Path, metadata: dict | None = None) -> Path:
    """Write a safetensors file through ``open`` so it gets the umask's mode, like every other file."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(save({k: v.contiguous() for k, v in sd.items()}, metadata=metadata))  # tiny files: fits in RAM
    return path


def write_dit(folder: Path, seed: int = 0) -> list[Path]:
    from ..liveavatar.tiny import tiny_transformer
    from ..liveavatar.transformer import LiveAvatarTransformer
    from ..model_loaders.fp8 import fp8_target_names
    from ..model_loaders.gguf_write import write_gguf_dit

    model = tiny_transformer(seed=seed, cfg=tiny_dit_config())
    sd = model.state_dict()
    keep = LiveAvatarTransformer.keep_in_fp32

    def plain(k: str, v: torch.Tensor) -> torch.Tensor:
        return v.float() if any(p in keep for p in k.split(".")) else v.to(torch.bfloat16)

    out = [_save({PREFIX + k: plain(k, v) for k, v in sd.items()}, folder / DIT_FILES[0])]
    targets = {n + ".weight" for n in fp8_target_names(model)}
    fp8 = {}
    for k, v in sd.items():
        if k in targets:
            scale = (v.float().abs().max() / 448.0).clamp(min=1e-12).reshape(())
            layer = k[: -len(".weight")]
            fp8[PREFIX + k] = (v.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            fp8[f"{PREFIX}{layer}.scale_weight"] = scale
            fp8[f"{PREFIX}{layer}.scale_input"] = torch.ones(())
        else:
            fp8[PREFIX + k] = plain(k, v)
    fp8[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    out.append(_save(fp8, folder / DIT_FILES[1]))
    for qtype, name in zip(GGUF_TYPES, GGUF_FILES):
        out.append(write_gguf_dit(sd, folder / name, qtype))
    return out


def write_lora(folder: Path, seed: int = 1, rank: int = 4) -> Path:
    from ..liveavatar.tiny import tiny_transformer

    model = tiny_transformer(seed=0, cfg=tiny_dit_config())
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        wanted = (full.startswith("blocks.") and (leaf in ("q", "k", "v", "o") or full.endswith(("ffn.0", "ffn.2")))) or (
            full.startswith("audio_injector.injector.") and leaf in ("q", "k", "v", "o"))
        if isinstance(module, torch.nn.Linear) and wanted:
            o, i = module.weight.shape
            sd[f"base_model.model.{full}.lora_A.weight"] = torch.randn(rank, i, generator=gen) * 0.01
            sd[f"base_model.model.{full}.lora_B.weight"] = torch.randn(o, rank, generator=gen) * 0.01
            sd[f"base_model.model.{full}.alpha"] = torch.tensor(float(rank))  # scaling 1 (a tiny rank has no default)
    return _save({k: v.to(torch.bfloat16) if v.dim() else v for k, v in sd.items()}, folder / LORA_FILE)


def write_vae(folder: Path, seed: int = 1) -> Path:
    from ..liveavatar.tiny import tiny_vae
    from ..model_loaders.vae import to_wan_state_dict

    return _save(to_wan_state_dict(tiny_vae(seed=seed).model), folder / VAE_FILE)


def write_text_encoder(folder: Path, seed: int = 3) -> Path:
    from ..liveavatar.tiny import tiny_text_encoder

    model = tiny_text_encoder(seed=seed, dim=TEXT_DIM, vocab=VOCAB)
    sd = {k: v.to(torch.float16) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return _save(sd, folder / TEXT_FILE)


_CORPUS = """A person speaks to the camera with natural expressions and gestures.
A woman talks calmly in a bright room, smiling now and then.
A man in a blue shirt explains something, nodding and moving his hands.
The speaker looks at the viewer, blinks, and turns the head slightly while talking.
Close-up portrait, soft light, plain background, realistic, high quality video."""


def write_tokenizer(folder: Path) -> Path:
    """A real umT5-style tokenizer folder (``spiece.model`` + ``tokenizer.json``) of the tiny vocabulary.

    Same special ids as umT5 (pad 0, eos 1, unk 2; ``</s>`` appended), a sentencepiece unigram model
    trained here on a few sentences, offline. ``tokenizer.json`` is built with the ``tokenizers``
    library from the sentencepiece pieces, so loading it needs no protobuf conversion.
    """
    import io
    import json

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 20), model_writer=buf, vocab_size=VOCAB,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5TokenizerFast", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "extra_ids": 0, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=1))
    return folder


def write_audio_encoder(folder: Path, seed: int = 2) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=AUDIO_DIM, num_hidden_layers=24, num_attention_heads=AUDIO_DIM // 64, intermediate_size=2 * AUDIO_DIM,
        conv_dim=(AUDIO_DIM,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, feat_extract_norm="layer",
        do_stable_layer_norm=True, vocab_size=32, conv_bias=True,
    )
    model = Wav2Vec2Model(config).eval()
    sd = {k: v.to(torch.float16) for k, v in model.state_dict().items() if not k.startswith("masked_spec_embed")}
    return _save(sd, folder / AUDIO_FILE)


def write_inputs(folder: Path) -> list[Path]:
    from ..liveavatar.demo_assets import synth_face, synth_speech
    from ..liveavatar.video import write_wav

    folder.mkdir(parents=True, exist_ok=True)
    image = folder / IMAGE_FILE
    synth_face(64, 128).save(image)  # small: the size budget only pads it, so CPU runs stay quick
    speech = folder / SPEECH_FILE
    write_wav(speech, synth_speech(SPEECH_SECONDS, 16000), 16000)
    return [image, speech]


def is_comfyui_models_dir(folder: Path) -> bool:
    """``folder`` is the ``models/`` folder of a ComfyUI installation (its parent holds ComfyUI's ``main.py``)."""
    parent = folder.resolve().parent
    return folder.name == "models" and (parent / "main.py").is_file() and (parent / "folder_paths.py").is_file()


def inputs_dir(out: Path) -> Path:
    """Where the example inputs go: ComfyUI's ``input/`` beside a ComfyUI ``models/`` folder, else ``out/input``."""
    return out.resolve().parent / "input" if is_comfyui_models_dir(out) else out / "input"


def write_tiny_models(out: str | Path) -> list[Path]:
    """Every tiny model file plus the example inputs (see ``inputs_dir``); returns the paths written."""
    out = Path(out)
    paths = write_dit(out / "diffusion_models")
    paths.append(write_lora(out / "loras"))
    paths.append(write_vae(out / "vae"))
    paths.append(write_text_encoder(out / "text_encoders"))
    paths.append(write_tokenizer(out / "text_encoders" / TOKENIZER_DIR))
    paths.append(write_audio_encoder(out / "audio_encoders"))
    paths += write_inputs(inputs_dir(out))
    return paths
