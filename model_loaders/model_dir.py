"""Find the model files of a run in a folder: upstream's checkpoint layout or ComfyUI's ``models/``.

Names only say where to look first; every candidate is then checked by its content (keys and
shapes read from the file's header, no weights), the way its loader will check it, and against
the chosen DiT (text width, audio width and layers, latent channels, LoRA shapes). A file the
loader would refuse is passed over when a valid one is there - e.g. Comfy-Org's
``wan2.2_vae.safetensors`` (the Wan 2.2 VAE, z_dim 48) beside ``wan_2.1_vae.safetensors``,
a Wan T2V/I2V DiT beside the S2V one, Flux's ``t5xxl`` beside ``umt5_xxl``. What was chosen
and what was passed over (and why) is in ``ModelFiles.report()``; a missing part is reported
with where to get it and the files that were refused for it.

Where content cannot tell two files apart (every Wan 2.1-architecture VAE, every LoRA for the
Wan blocks), a name is required as well: ``vae``+``wan``/``2.1`` for the VAE, ``liveavatar``
for the LoRA. A diffusers VAE folder is not searched for; give it with ``--vae``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .formats import KIND_NAMES, ModelFileError, open_checkpoint

PARTS = ("dit", "lora", "vae", "text_encoder", "tokenizer", "audio_encoder")

WHERE = {
    "dit": "Wan-AI/Wan2.2-S2V-14B (the sharded diffusion_pytorch_model-*.safetensors + config.json), "
    "or ComfyUI's wan2.2_s2v_14B_bf16.safetensors / _fp8_scaled.safetensors (or a Wan2.2-S2V-14B-*.gguf) "
    "in models/diffusion_models/",
    "lora": "Quark-Vision/Live-Avatar: liveavatar.safetensors (ComfyUI: models/loras/)",
    "vae": "Wan2.2-S2V-14B/Wan2.1_VAE.pth, or ComfyUI's wan_2.1_vae.safetensors in models/vae/",
    "text_encoder": "Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth, or ComfyUI's umt5_xxl_fp16.safetensors "
    "(or _fp8_e4m3fn_scaled) in models/text_encoders/",
    "tokenizer": "Wan2.2-S2V-14B/google/umt5-xxl/ (the tokenizer files of google/umt5-xxl)",
    "audio_encoder": "Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/ (HF folder), or ComfyUI's "
    "wav2vec2_large_english_fp16.safetensors in models/audio_encoders/",
}

_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")
_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt", ".gguf")
_FOLDERS = {  # ComfyUI's models/ sub-folders per part
    "dit": ("diffusion_models", "unet"),
    "text_encoder": ("text_encoders", "clip"),
    "audio_encoder": ("audio_encoders",),
}


@dataclass
class ModelFiles:
    dit: Path | None = None
    lora: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    audio_encoder: Path | None = None
    found: dict[str, str] = field(default_factory=dict)  # part -> what its content is
    passed_over: dict[str, list[str]] = field(default_factory=dict)  # part -> ["path: why refused"]

    def missing(self) -> list[str]:
        return [name for name in PARTS if getattr(self, name) is None]

    def report(self) -> list[str]:
        """One line per part: the file chosen (and what it is), then the files passed over and why."""
        lines = []
        for name in PARTS:
            path = getattr(self, name)
            if path is not None:
                lines.append(f"{name}: {path}" + (f" ({self.found[name]})" if name in self.found else ""))
            lines += [f"  {name}: passed over {why}" for why in self.passed_over.get(name, [])]
        return lines

    def require(self, root: Path) -> "ModelFiles":
        missing = self.missing()
        if missing:
            lines = []
            for name in missing:
                lines.append(f"  - {name}: get {WHERE[name]}")
                lines += [f"      (found but refused: {why})" for why in self.passed_over.get(name, [])]
            raise FileNotFoundError(f"{root}: model files not found:\n" + "\n".join(lines))
        return self


# ----------------------------------------------------------------------------- content
class _Refused(Exception):
    """A candidate its loader would refuse (the message says why)."""


@dataclass
class _Header:
    kind: str
    shapes: dict[str, tuple[int, ...]]  # model keys (prefix and fp8 side tensors stripped) -> shape
    config: dict | None


@dataclass
class _DiTFacts:
    in_dim: int
    text_dim: int
    audio_dim: int
    num_audio_layers: int
    shapes: dict[str, tuple[int, ...]]


_HEADERS: dict[tuple, _Header | str] = {}


def _header(path: Path) -> _Header:
    """Kind and shapes from the file's header (cached per file version; a .pth is memory-mapped, not read)."""
    stat = path.stat()
    key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
    cached = _HEADERS.get(key)
    if cached is None:
        try:
            with open_checkpoint(path) as ckpt:
                cached = _Header(ckpt.kind, {n: ckpt.shape(k) for n, k in ckpt.model_keys().items()}, ckpt.config)
        except (ModelFileError, OSError, ValueError) as exc:
            cached = f"unreadable ({str(exc)[:200]})"
        _HEADERS[key] = cached
    if isinstance(cached, str):
        raise _Refused(cached)
    return cached


def _need_kind(h: _Header, kind: str) -> None:
    if h.kind != kind:
        raise _Refused(f"its keys are those of a {KIND_NAMES.get(h.kind, h.kind)}; expected a {KIND_NAMES[kind]}")


def _layers(shapes, prefix: str) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _check_dit(path: Path, dit: _DiTFacts | None) -> tuple[str, _DiTFacts]:
    from ..liveavatar.config import DiTConfig
    from .dit import infer_dit_config

    h = _header(path)
    _need_kind(h, "liveavatar_dit")
    try:
        cfg = DiTConfig.from_dict(h.config) if h.config else infer_dit_config(h.shapes)
    except (TypeError, ValueError) as exc:
        raise _Refused(f"the DiT configuration cannot be read ({exc})") from None
    facts = _DiTFacts(cfg.in_dim, cfg.text_dim, cfg.audio_dim, cfg.num_audio_layers, h.shapes)
    return f"S2V DiT, dim {cfg.dim}, {cfg.num_layers} layers", facts


def _check_vae(path: Path, dit: _DiTFacts | None) -> str:
    from .vae import infer_wan_vae_config

    h = _header(path)
    _need_kind(h, "wan_vae")
    s = h.shapes
    if "encoder.conv1.weight" not in s or "conv2.weight" not in s:
        raise _Refused("a diffusers-layout VAE file; give its model folder (config.json + weights) with --vae")
    z, channels = s["conv2.weight"][0], s["encoder.conv1.weight"][1]
    latent = dit.in_dim if dit else 16
    if any(".downsamples.0.downsamples." in k for k in s) or z == 48 or channels == 12:
        raise _Refused(f"a Wan 2.2 VAE (z_dim {z}, {channels} input channels: 2x2 patches); LiveAvatar uses the "
                       "Wan 2.1 VAE (z_dim 16, 3 input channels)")
    if z != latent:
        raise _Refused(f"a VAE with z_dim {z}; the DiT takes {latent} latent channels")
    try:
        infer_wan_vae_config({k: torch.empty(v, device="meta") for k, v in s.items()}, path.name)
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    return f"Wan 2.1 VAE, z_dim {z}"


def _check_text(path: Path, dit: _DiTFacts | None) -> str:
    h = _header(path)
    _need_kind(h, "umt5")
    s = h.shapes
    embed = s.get("shared.weight") or s.get("encoder.embed_tokens.weight") or s.get("token_embedding.weight")
    if embed is None:
        raise _Refused("a T5 file without its token embedding")
    hf = _layers(s, "encoder.block.")
    layers = hf or _layers(s, "blocks.")
    bias1 = ("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" if hf
             else "blocks.1.pos_embedding.embedding.weight")
    if layers > 1 and bias1 not in s:
        raise _Refused("a T5 encoder (position bias in block 0 only, e.g. Flux's t5xxl), not umT5 (a bias per block)")
    if dit and embed[1] != dit.text_dim:
        raise _Refused(f"a umT5 of width {embed[1]}; the DiT takes text of width {dit.text_dim}")
    return f"umT5 encoder, {layers} layers, width {embed[1]}"


def _check_audio(path: Path, dit: _DiTFacts | None) -> str:
    h = _header(path)
    _need_kind(h, "wav2vec2")
    layers = _layers(h.shapes, "encoder.layers.")
    width = h.shapes["encoder.layers.0.attention.k_proj.weight"][0]
    if dit and (width, layers + 1) != (dit.audio_dim, dit.num_audio_layers):
        raise _Refused(f"a wav2vec2 of width {width} with {layers + 1} hidden states; the DiT mixes "
                       f"{dit.num_audio_layers} hidden states of width {dit.audio_dim}")
    return f"wav2vec2, {layers} layers, width {width}"


def _check_lora(path: Path, dit: _DiTFacts | None) -> str:
    from ..liveavatar.lora import LoraError, peft_wrapped
    from .lora_file import read_lora

    try:
        lora = read_lora(path)
    except (ModelFileError, OSError) as exc:
        raise _Refused(str(exc).replace(f"LoRA file {path}: ", "")) from None
    with lora:
        if dit is not None:
            for name, pair in sorted(lora.pairs.items()):
                w = dit.shapes.get(name + ".weight")
                if w is None or len(w) != 2 or (tuple(pair.b.shape[:1]), tuple(pair.a.shape[1:])) != ((w[0],), (w[1],)):
                    raise _Refused(f"its module {name} (A {tuple(pair.a.shape)}, B {tuple(pair.b.shape)}) does not fit the "
                                   f"DiT ({'no such Linear' if w is None else f'weight {w}'})")
            linears = {k[: -len(".weight")] for k, v in dit.shapes.items() if k.endswith(".weight") and len(v) == 2}
            try:
                lora.replacements(dit.shapes, peft_wrapped(linears) | set(lora.pairs))
            except LoraError as exc:
                raise _Refused(str(exc)) from None
        extra = f", {len(lora.full)} full tensors" if lora.full else ""
        return f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, {len(lora.pairs)} modules{extra}"


# ----------------------------------------------------------------------------- search
def _walk(root: Path, max_depth: int = 4):
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if len(here.parts) - root_depth >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        yield here, sorted(dirnames), sorted(filenames)


def _name_has(name: str, *words: str) -> bool:
    low = name.lower().replace("-", "_").replace(".", "_")
    return all(w in low for w in words)


def _score(part: str, path: Path, is_dir: bool) -> int:
    """How likely a file is the part by its name and folder (0: not a candidate); higher is tried first."""
    name, folder = path.name, path.parent.name
    in_folder = folder in _FOLDERS.get(part, ())
    if part == "dit":
        if is_dir:
            return 3 if _name_has(name, "s2v") or any(p.name.startswith("diffusion") for p in path.glob("*.index.json")) else 1
        if folder == "loras":
            return 0
        score = 3 if _name_has(name, "s2v") else 2 if in_folder else 0
        return score - 1 if score and path.suffix == ".gguf" else score  # beside a bf16/fp8 file, that one wins
    if part == "lora":
        return 3 if not is_dir and _name_has(name, "liveavatar") else 0
    if part == "vae":
        if is_dir or not _name_has(name, "vae"):
            return 0
        return 3 if _name_has(name, "2_1") else 2 if _name_has(name, "wan") else 0
    if part == "text_encoder":
        return 0 if is_dir else 3 if _name_has(name, "umt5") else 1 if in_folder else 0
    if part == "audio_encoder":
        if not _name_has(name, "wav2vec2"):
            return 1 if in_folder and not is_dir else 0
        return 3 if _name_has(name, "english") else 2
    return 0


_CHECKS: dict[str, Callable] = {"vae": _check_vae, "text_encoder": _check_text, "audio_encoder": _check_audio,
                                "lora": _check_lora}


def _candidates(root: Path) -> tuple[list[Path], list[Path], Path | None]:
    """(weight files, model folders, tokenizer folder) under ``root``."""
    files, folders, tokenizer = [], [], None
    for here, _dirs, names in _walk(root):
        if any(f.endswith(".safetensors.index.json") for f in names):
            folders.append(here)
        elif "config.json" in names and any(f.endswith(_WEIGHT_SUFFIXES) for f in names):
            folders.append(here)
        if tokenizer is None and set(names) & set(_TOKENIZER_FILES) and "umt5" in here.name.lower():
            tokenizer = here
        files += [here / f for f in names if f.endswith(_WEIGHT_SUFFIXES)]
    return files, folders, tokenizer


def _choose(part: str, files: list[Path], folders: list[Path], found: ModelFiles, check) -> tuple[Path, str, object] | None:
    """The best-named candidate that passes ``check``; every other candidate is reported (refused: why)."""
    ranked = [(s, p) for p in folders if (s := _score(part, p, True))] + [(s, p) for p in files if (s := _score(part, p, False))]
    chosen = None
    for _score_, path in sorted(ranked, key=lambda sp: (-sp[0], str(sp[1]))):
        try:
            result = check(path)
        except _Refused as why:
            found.passed_over.setdefault(part, []).append(f"{path}: {why}")
            continue
        if chosen is None:
            chosen = (path, *result) if isinstance(result, tuple) else (path, result, None)
        else:
            found.passed_over.setdefault(part, []).append(f"{path}: fits too (give it explicitly to use it)")
    return chosen


def find_model_files(root: str | os.PathLike, **overrides: str | os.PathLike | None) -> ModelFiles:
    """Locate each part under ``root`` by content; explicit ``overrides`` (e.g. ``lora=...``) win unchecked."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"models folder {root} does not exist")
    for key, value in overrides.items():
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{key.replace('_', '-')} {value} does not exist")
    given = {k: Path(v) for k, v in overrides.items() if v is not None}
    found = ModelFiles(**given)
    files, folders, tokenizer = _candidates(root)
    dit: _DiTFacts | None = None
    if "dit" in given:
        try:
            found.found["dit"], dit = _check_dit(given["dit"], None)
        except _Refused:
            pass  # the loader will say what is wrong with the given file
    else:
        chosen = _choose("dit", files, folders, found, lambda p: _check_dit(p, None))
        if chosen:
            found.dit, found.found["dit"], dit = chosen
    for part, check in _CHECKS.items():
        if part in given:
            continue
        chosen = _choose(part, files, folders, found, lambda p, check=check: check(p, dit))
        if chosen:
            setattr(found, part, chosen[0])
            found.found[part] = chosen[1]
    if "tokenizer" not in given:
        found.tokenizer = tokenizer
    return found
