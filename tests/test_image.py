"""Reference image: upstream's size rule (both branches) and pixel preprocessing."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import golden_subdir
from liveavatar_pack.liveavatar.image import (
    load_reference_image,
    parse_size,
    resize_center_crop,
    target_size,
    to_pil,
)


def _golden_max_area(golden_dir) -> int:
    """max_area given to generate: from a call log that records the launch arguments, else the MANIFEST."""
    for sub in ("pipeline", "pipeline_tpp"):
        path = golden_dir / sub / "call_log.json"
        if path.is_file():
            log = json.loads(path.read_text())
            for holder in (log, log.get("launch", {}), log.get("generate_args", {})):
                if "max_area" in holder:
                    return int(holder["max_area"])
    match = re.search(r"max_area=(\d+)", (golden_dir / "MANIFEST.md").read_text())
    assert match, "neither a call_log.json nor MANIFEST.md records the max_area given to generate"
    return int(match.group(1))


@pytest.mark.golden
def test_ref_pixel_values_match_golden(golden_dir):
    pipe = golden_subdir(golden_dir, "pipeline")
    golden = load_file(str(pipe / "golden.safetensors"))["ref_pixel_values"]
    max_area = _golden_max_area(golden_dir)
    out = load_reference_image(pipe / "ref_image.png", max_area)
    log = json.loads((pipe / "call_log.json").read_text())
    if "generated_size_hw" in log:
        assert list(out.shape[1:]) == list(log["generated_size_hw"])
    assert out.shape == golden.shape and out.dtype == torch.float32
    err = (out - golden).abs().max().item()
    assert err <= 2e-5 * max(1.0, golden.abs().max().item()), err
    # the same image as a ComfyUI IMAGE tensor (float 0..1, [1, H, W, 3]) gives the same pixels
    arr = np.asarray(Image.open(pipe / "ref_image.png").convert("RGB"), dtype=np.float32) / 255.0
    assert torch.equal(load_reference_image(torch.from_numpy(arr)[None], max_area), out)


@pytest.mark.parametrize("hw", [(1080, 1920), (1920, 1080), (4000, 3000), (3000, 4000), (700, 700)])
def test_photo_sizes_fit_the_budget(hw):
    max_area = parse_size("704*384")
    h, w = target_size(*hw, max_area)
    assert h % 64 == 0 and w % 64 == 0 and h * w <= max_area
    assert h * w >= 0.75 * max_area  # the budget is used, not wasted
    assert abs(np.log((h / w) / (hw[0] / hw[1]))) < 0.12  # aspect kept within the 64-pixel grid


def test_landscape_1080p_at_704x384_is_384x704():
    assert target_size(1080, 1920, parse_size("704*384")) == (384, 704)


def test_small_image_branch_pads_up_to_multiples_of_64():
    # 72x56 <= 8192: scale 1 already fits after rounding up: 72 -> 128, 56 -> 64
    assert target_size(72, 56, 8192) == (128, 64)
    # 100x150 <= 704*384: rounded up to 128x192, never shrunk
    assert target_size(100, 150, parse_size("704*384")) == (128, 192)
    # 72x56 with only 4096 pixels: scale steps down until 64x64 fits
    assert target_size(72, 56, 4096) == (64, 64)


def test_center_crop_pads_with_black_when_needed():
    img = Image.new("RGB", (56, 72), (255, 255, 255))  # W x H
    arr = resize_center_crop(img, 128, 64)  # Resize(64): 64 x 82, then pad to 128 rows
    assert arr.shape == (128, 64, 3)
    assert (arr[:23] == 0).all() and (arr[-23:] == 0).all() and (arr[23:105] == 255).all()


def test_pixel_range_and_shape_for_a_photo_sized_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = load_reference_image(img, "256*192")
    assert out.shape == (3, 192, 256) and out.min() >= -1 and out.max() <= 1


def test_modes_rgba_palette_grey(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    px = to_pil(tmp_path / "a.png").getpixel((0, 0))
    assert px == (10, 20, 30)  # alpha dropped, as upstream's convert('RGB')
    Image.new("L", (64, 64), 200).save(tmp_path / "g.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).convert("P").save(tmp_path / "p.png")
    Image.new("RGB", (64, 64), (9, 8, 7)).save(tmp_path / "j.jpg")
    for name in ("a.png", "g.png", "p.png", "j.jpg"):
        assert load_reference_image(tmp_path / name, 4096).shape == (3, 64, 64)
    assert to_pil(tmp_path / "g.png").getpixel((0, 0)) == (200, 200, 200)


def test_non_image_and_bad_size_are_clear_errors(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_reference_image(bad, 4096)
    with pytest.raises(ValueError, match="does not exist"):
        load_reference_image(tmp_path / "missing.png", 4096)
    with pytest.raises(ValueError, match="W\\*H"):
        parse_size("big")
    assert parse_size("704*384") == 704 * 384 == parse_size("704x384")


# ---------------------------------------------------------------- oversized images (issue #11)

def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares ``width x height`` (its IHDR) with a tiny empty IDAT: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 11000])  # beyond PIL's own error limit; between ours and PIL's
def test_huge_image_is_refused_in_one_line_with_the_limit(tmp_path, side):
    import warnings

    from liveavatar_pack.liveavatar import image as image_module

    path = tmp_path / "bomb.png"
    _png_header_only(path, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ValueError) as err:
            load_reference_image(path, "256*256")
    text = str(err.value)
    assert type(err.value) is ValueError and "\n" not in text, text
    assert f"{side}x{side}" in text or f"{side * side / 1e6:.0f} megapixels" in text, text
    assert f"at most {image_module.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels" in text and str(path) in text
