"""Hostile and damaged model files (issue #11): non-finite weights, index entries leaving their
folder, FIFOs and devices given as model files, forged safetensors offsets.

Each file is written by the test itself, from tiny random models or byte by byte.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from liveavatar_pack.liveavatar.tiny import tiny_transformer, tiny_vae
from liveavatar_pack.model_loaders.dit import load_dit
from liveavatar_pack.model_loaders import formats
from liveavatar_pack.model_loaders.formats import ModelFileError, open_checkpoint
from liveavatar_pack.model_loaders.vae import load_wan_vae, to_wan_state_dict


def _dit_state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_transformer(seed=3).state_dict().items()}


def _dit_config() -> dict:
    cfg = tiny_transformer(seed=3).cfg
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}


def _write_sharded(folder: Path, state: dict[str, torch.Tensor], names: dict[str, str] | None = None) -> Path:
    """A Wan-AI style sharded DiT folder; ``names`` overrides the shard names written into the index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        fname = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, folder / fname)
        weight_map.update({k: (names or {}).get(fname, fname) for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(_dit_config()))
    return folder


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ---------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dit_with_non_finite_weights_is_refused_naming_file_and_tensor(tmp_path, bad):
    state = _dit_state()
    key = "blocks.1.self_attn.k.weight"
    state[key] = state[key].clone()
    state[key][3, 5] = bad
    path = tmp_path / "dit.safetensors"
    save_file(state, path)
    with pytest.raises(ModelFileError) as err:
        load_dit(path, precision="fp32", config=_dit_config())
    text = str(err.value)
    assert str(path) in text and repr(key) in text and "1 NaN/Inf" in text, text


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_all_nan_dit_is_refused_when_converted_while_read(tmp_path, precision):
    """``read_as`` (the conversion path of a bf16/fp16 load) checks each chunk as it is read."""
    state = {k: torch.full_like(v, float("nan")) for k, v in _dit_state().items()}
    folder = _write_sharded(tmp_path / "dit", state)
    with pytest.raises(ModelFileError, match="NaN/Inf"):
        load_dit(folder, precision=precision)


def test_vae_with_nan_weights_is_refused(tmp_path):
    state = {k: v.contiguous() for k, v in to_wan_state_dict(tiny_vae(seed=1).model).items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[key] = torch.full_like(state[key], float("nan"))
    path = tmp_path / "vae.safetensors"
    save_file(state, path)
    with pytest.raises(ModelFileError) as err:
        load_wan_vae(path)
    assert repr(key) in str(err.value) and str(path) in str(err.value)


def test_nan_in_a_pth_file_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a.weight": torch.tensor([1.0, float("-inf"), 2.0])}, path)
    with open_checkpoint(path) as ckpt, pytest.raises(ModelFileError, match=r"'a.weight'.*1 NaN/Inf"):
        ckpt.read("a.weight")


@pytest.mark.parametrize("dtype,pattern", [(torch.float8_e4m3fn, 0x7F), (torch.float8_e5m2, 0x7C)])
def test_fp8_non_finite_bit_patterns_are_counted(dtype, pattern):
    t = torch.linspace(-3, 3, 1000).to(dtype)
    assert formats.count_nonfinite(t) == 0
    raw = t.view(torch.uint8).clone()
    raw[[1, 500]] = pattern
    raw[7] = pattern | 0x80
    assert formats.count_nonfinite(raw.view(dtype)) == 3


def test_large_finite_values_are_not_counted_as_non_finite():
    """A sum that overflows (finite fp16 weights) must not be taken for a NaN/Inf weight."""
    t = torch.full((100_000,), 60000.0, dtype=torch.float16)
    assert formats.count_nonfinite(t) == 0
    assert formats.count_nonfinite(torch.arange(10)) == 0


# ---------------------------------------------------------------- sharded index leaving its folder

@pytest.mark.parametrize("entry", ["../outside/{name}", "{abs}", "sub/../../outside/{name}"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, entry):
    state = _dit_state()
    outside = _write_sharded(tmp_path / "outside", state)  # a real DiT elsewhere: must not be loaded
    name = "diffusion_pytorch_model-00001-of-00002.safetensors"
    folder = _write_sharded(tmp_path / "model" / "dit", state,
                            {name: entry.format(name=name, abs=outside / name).replace("../outside", "../../outside")})
    with pytest.raises(ModelFileError, match="points outside the index's folder"):
        open_checkpoint(folder)


def test_index_entry_naming_etc_passwd_is_refused_before_reading_it(tmp_path):
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "x.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../../../../../../../etc/passwd"}}))
    with pytest.raises(ModelFileError) as err:
        open_checkpoint(folder)
    assert "points outside" in str(err.value) and "bytes" not in str(err.value)


def test_symlinked_shard_leaving_the_folder_is_refused(tmp_path):
    state = _dit_state()
    outside = _write_sharded(tmp_path / "outside", state)
    folder = _write_sharded(tmp_path / "dit", state)
    name = "diffusion_pytorch_model-00001-of-00002.safetensors"
    (folder / name).unlink()
    (folder / name).symlink_to(outside / name)
    with pytest.raises(ModelFileError, match="points outside"):
        open_checkpoint(folder)


def test_hub_cache_snapshot_with_blob_symlinks_still_loads(tmp_path):
    """huggingface_hub's cache keeps files in ``blobs/`` and symlinks them from ``snapshots/<rev>/``."""
    repo = tmp_path / "models--Wan-AI--tiny"
    src = _write_sharded(tmp_path / "src", _dit_state())
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        f.rename(blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    with open_checkpoint(snap) as ckpt:
        assert ckpt.kind == "liveavatar_dit" and len(ckpt.files) == 2


# ---------------------------------------------------------------- FIFOs, devices, forged offsets

def _fails_within(fn, seconds: float = 20.0) -> BaseException:
    """Run ``fn`` in a thread; it must raise within ``seconds`` (a hang is a failure, not a stuck test)."""
    box: list[BaseException | None] = [None]

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box[0] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} still blocked after {seconds} s (open() of a FIFO?)"
    assert box[0] is not None, "expected an error"
    return box[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.parametrize("name", ["dit.safetensors", "dit.pth"])
def test_fifo_as_model_file_is_refused_without_blocking(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    err = _fails_within(lambda: open_checkpoint(fifo))
    assert isinstance(err, ModelFileError) and "FIFO" in str(err), err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_fifo_as_shard_or_index_is_refused_without_blocking(tmp_path):
    folder = _write_sharded(tmp_path / "dit", _dit_state())
    name = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (folder / name).unlink()
    os.mkfifo(folder / name)
    err = _fails_within(lambda: open_checkpoint(folder))
    assert isinstance(err, ModelFileError) and "FIFO" in str(err) and name in str(err), err
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    err = _fails_within(lambda: open_checkpoint(folder))
    assert isinstance(err, ModelFileError) and "FIFO" in str(err), err


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_character_device_is_refused():
    with pytest.raises(ModelFileError, match="character device"):
        open_checkpoint("/dev/zero")


@pytest.mark.parametrize("offsets,why", [
    ([-8, 0], "0 <= begin <= end"),
    ([8, 0], "0 <= begin <= end"),
    ([0, 16], "needs 8 bytes"),
    ([4, 12], "overlap"),
    ([16, 24], "truncated"),
])
def test_out_of_range_data_offsets_are_refused(tmp_path, offsets, why):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": offsets},
    }
    path = _raw_safetensors(tmp_path / "forged.safetensors", header, bytes(16))
    with pytest.raises(ModelFileError, match=why):
        open_checkpoint(path)


def test_negative_offset_never_reads_header_bytes_as_data(tmp_path):
    """The probe: ``data_offsets [-N, 0]`` made the header's own JSON readable as a tensor."""
    header = {"a": {"dtype": "U8", "shape": [16], "data_offsets": [-16, 0]}}
    path = _raw_safetensors(tmp_path / "forged.safetensors", header, b"")
    with pytest.raises(ModelFileError, match="data_offsets"):
        open_checkpoint(path)



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_preflight_of_a_folder_with_a_fifo_pth_does_not_block(tmp_path):
    from liveavatar_pack.cli.preflight import check_model_file

    folder = tmp_path / "vae"
    folder.mkdir()
    os.mkfifo(folder / "Wan2.1_VAE.pth")
    err = _fails_within(lambda: check_model_file("vae", folder))
    assert isinstance(err, ValueError) and "FIFO" in str(err), err


def test_a_fifo_as_a_diffusers_vae_config_is_refused_not_waited_on(tmp_path):
    """A FIFO named config.json in a diffusers VAE folder: refused from stat, the read never blocks."""
    from liveavatar_pack.model_loaders.vae import load_wan_vae

    folder = tmp_path / "vae_dir"
    folder.mkdir()
    os.mkfifo(folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    result = {}

    def load():
        try:
            load_wan_vae(folder)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            result["error"] = err

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(60)  # a hang guard, not a timing assertion
    assert not worker.is_alive(), "loading blocked on the FIFO"
    assert "config.json" in str(result.get("error")) and "regular" in str(result.get("error"))
