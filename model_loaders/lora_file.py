"""LoRA files -> the PEFT pairs the engine merges (``liveavatar.lora``), read lazily.

Accepted: PEFT safetensors/.pth (``<module>.lora_A[.<adapter>].weight`` / ``lora_B``, with or
without ``base_model.model.``), the same with ComfyUI's ``diffusion_model.`` prefixes, and the
``lora_down``/``lora_up`` spelling. Alpha, in order: an explicit ``alpha`` argument; an
``adapter_config.json`` beside the file (``lora_alpha``, ``r``; also ``<stem>_config.json`` or
``<stem>.json`` with ``lora_alpha``/``alpha`` and ``r``/``lora_rank``); per-module ``.alpha``
keys; the engine's known LiveAvatar rule (rank 128 -> alpha 64).

Other tensors in the file (upstream loads LiveAvatar's file non-strictly, so full tensors there
replace the base model's) are kept as ``full`` (name without prefix -> key in the file); which
model tensor each replaces, or why it is refused, is decided against the model by
``liveavatar.lora.replacement_targets`` (``load_dit`` does it before reading any weight).

Only shapes are read up front; the matrices of one module are read when it is merged, so a
loader can merge each Linear as its weight is materialised.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..liveavatar.lora import LoraError, LoraPair, is_lora_key, parse_lora_state_dict, replacement_targets, resolve_alpha
from .formats import Checkpoint, ModelFileError, open_checkpoint

__all__ = ["LoraFile", "read_lora"]

_STRIP = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
_RENAME = ((".lora_down.", ".lora_A."), (".lora_up.", ".lora_B."))
_CONFIG_NAMES = ("adapter_config.json", "{stem}_config.json", "{stem}.json")
_PAIR_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _canonical(key: str) -> str:
    for prefix in _STRIP:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for old, new in _RENAME:
        key = key.replace(old, new)
    return key


@dataclass
class LoraFile:
    """A LoRA read lazily: ``pairs`` hold meta tensors (shapes only) until ``read_pair``."""

    path: Path
    rank: int
    alpha: float
    alpha_source: str
    pairs: dict[str, LoraPair]
    _ckpt: Checkpoint
    _raw: dict[tuple[str, str], str]  # (module, "A"/"B") -> raw key in the file
    notes: list[str] = field(default_factory=list)
    full: dict[str, str] = field(default_factory=dict)  # non-LoRA tensors: name (prefix stripped) -> raw key

    @property
    def checkpoint(self) -> Checkpoint:
        """The open file, for reading the ``full`` tensors (``checkpoint.read(full[name])``)."""
        return self._ckpt

    def replacements(self, params: dict[str, tuple[int, ...]], wrapped: set[str]) -> dict[str, str]:
        """{model tensor: raw key} for the ``full`` tensors (``liveavatar.lora.replacement_targets``)."""
        names = {raw: name for name, raw in self.full.items()}
        shapes = {raw: self._ckpt.shape(raw) for raw in names}
        return replacement_targets(shapes, params, wrapped, name_of=names.__getitem__)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        return sorted(self.pairs)

    def read_pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, in], B [out, rank]) of one module, read from the file now."""
        return self._ckpt.read(self._raw[(module, "A")]), self._ckpt.read(self._raw[(module, "B")])

    def delta(self, module: str, device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
        """(B @ A) * (alpha / rank) in float32 - the same arithmetic as ``merge_lora`` (into ``out`` if given)."""
        a, b = self.read_pair(module)
        return torch.mm(b.to(device, torch.float32), a.to(device, torch.float32), out=out).mul_(self.scaling)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All matrices (and full tensors) as a PEFT state dict (canonical keys), for ``merge_lora``."""
        out = {}
        for module in self.pairs:
            a, b = self.read_pair(module)
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
        for name, key in self.full.items():
            out[name] = self._ckpt.read(key)
        return out

    def close(self) -> None:
        self._ckpt.close()

    def __enter__(self) -> "LoraFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _config_beside(path: Path) -> tuple[dict | None, Path | None]:
    folder = path.parent if path.is_file() else path
    stem = path.name.split(".")[0]
    for pattern in _CONFIG_NAMES:
        candidate = folder / pattern.format(stem=stem)
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), candidate
            except ValueError as exc:
                raise ModelFileError(f"{candidate}: expected the LoRA's JSON adapter config; found invalid JSON ({exc})") from None
    return None, None


def read_lora(path: str | os.PathLike, alpha: float | None = None) -> LoraFile:
    """Open a LoRA file (or a PEFT directory with ``adapter_model.safetensors``) for merging."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    try:
        if ckpt.kind != "lora":
            from .formats import KIND_NAMES

            raise ModelFileError(
                f"{path}: expected a PEFT LoRA (keys <module>.lora_A.weight / lora_B.weight); "
                f"found a {KIND_NAMES.get(ckpt.kind, ckpt.kind)} file ({ckpt.sample_keys()})"
            )
        raw: dict[tuple[str, str], str] = {}
        shapes: dict[str, torch.Tensor] = {}
        file_alphas: dict[str, torch.Tensor] = {}
        full: dict[str, str] = {}
        for key in ckpt.keys():
            canon = _canonical(key)
            m = _PAIR_KEY.match(canon)
            if m:
                raw[(m["module"], m["which"])] = key
                shapes[canon] = torch.empty(ckpt.shape(key), device="meta")
            elif is_lora_key(canon) and ckpt.infos[key].numel == 1:
                file_alphas[canon] = ckpt.read(key).float()
            else:
                full[canon] = key  # a full tensor: checked against the model by the loader
        config, config_path = _config_beside(path)
        config_alpha = None
        if config is not None:
            config_alpha = config.get("lora_alpha", config.get("alpha"))
            config_rank = config.get("r", config.get("lora_rank", config.get("rank")))
        source = "the LiveAvatar default"
        try:
            # An explicit alpha or an adapter config wins over per-module alpha keys.
            use_keys = alpha is None and config_alpha is None
            pairs = parse_lora_state_dict({**shapes, **(file_alphas if use_keys else {})})
            rank, resolved = resolve_alpha(pairs, alpha if alpha is not None else config_alpha)
        except LoraError as exc:
            raise ModelFileError(f"LoRA file {path}: {exc}") from None
        if alpha is not None:
            source = "given"
        elif config_alpha is not None:
            source = config_path.name
            if config_rank is not None and int(config_rank) != rank:
                raise ModelFileError(
                    f"LoRA file {path}: {config_path.name} says rank r={config_rank}; the file's matrices have rank {rank} "
                    "(the config beside it belongs to another LoRA)"
                )
        elif file_alphas:
            source = "alpha keys in the file"
        return LoraFile(path, rank, float(resolved), source, pairs, ckpt, raw, full=full)
    except BaseException:
        ckpt.close()
        raise
