"""Reference image -> the pixel tensor ``[3, H, W]`` in [-1, 1] that conditions generation.

The output size follows upstream's ``get_size_less_than_area``: ``--size W*H`` is a pixel budget, not a
shape; the output keeps the image's aspect as closely as sides that are multiples of 64 allow. The
pixels follow upstream's torchvision chain on a PIL image (``Resize(min(H, W))`` of the shorter side,
bilinear with PIL's antialiasing, then ``CenterCrop((H, W))`` padding with black where the resized
image is smaller, ``/255``, ``*2-1``), done here with PIL and numpy so torchvision is not needed.

Modes: like upstream's ``Image.convert('RGB')``, the alpha channel of RGBA/LA/transparent-palette
images is dropped (not composited); greyscale is replicated to three channels; 16-bit greyscale is
scaled to 8 bits. Unlike upstream, the EXIF orientation of a photo is applied first (as ComfyUI's
LoadImage does), so a file and the same file loaded through ComfyUI give the same tensor.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE_DIVISOR = 64  # both output sides are multiples of this (VAE stride 8 x patch 2 x upstream's choice)
# Largest reference image file read, in pixels: 120 MP takes a 108 MP phone photo (12032x9024) and
# costs ~360 MB decoded as RGB; a "decompression bomb" (a tiny PNG declaring 20000x20000) is refused
# from its header in one line. Documented in the README ("Reference image").
MAX_IMAGE_PIXELS = 120_000_000


def parse_size(size: str | int) -> int:
    """``"704*384"`` (or ``704x384``) -> the maximum pixel area 270336; an int passes through."""
    if isinstance(size, int):
        area = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*[*xX×]\s*(\d+)\s*", str(size))
        if not m:
            raise ValueError(f"size {size!r} must look like 'W*H', e.g. '704*384'")
        area = int(m.group(1)) * int(m.group(2))
    if area < SIZE_DIVISOR * SIZE_DIVISOR:
        raise ValueError(f"size {size!r} is below the smallest output, {SIZE_DIVISOR}x{SIZE_DIVISOR} pixels")
    return area


def _round_up(value: int, divisor: int) -> int:
    return value + (divisor - value % divisor) % divisor


def target_size(height: int, width: int, max_area: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """Output ``(H, W)`` for an ``height x width`` image: upstream's ``get_size_less_than_area``.

    Scales ``s`` are tried from the largest down (100 steps); each gives ``int(side * s)`` rounded *up*
    to ``divisor``, and the first pair within ``max_area`` wins. An image already within the budget
    tries ``s`` from 1 down to 0.1 (so it is at most padded up, never shrunk needlessly); a larger one
    from ``sqrt(max_area / area)`` (no padding needed) down to the scale at which the worst-case padding
    still fits (upstream's quadratic bound, kept as written). If none fits, an aspect-preserving size
    rounded *down* is used, never above the image's own size.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is empty")
    if height * width <= max_area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = divisor - 1
        a, b, c = height * width, d * (height + width), d * d - max_area
        min_scale = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_area / (height * width))
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        h, w = _round_up(int(height * scale), divisor), _round_up(int(width * scale), divisor)
        if 0 < h * w <= max_area:  # a zero side (tiny image, tiny scale) is no answer
            return h, w
    aspect = width / height
    tw = int((max_area * aspect) ** 0.5 // divisor * divisor)
    th = int((max_area / aspect) ** 0.5 // divisor * divisor)
    if tw >= width or th >= height:
        tw, th = int(width // divisor * divisor), int(height // divisor * divisor)
    if th <= 0 or tw <= 0:
        raise ValueError(
            f"no output size of multiples of {divisor} fits {max_area} pixels for a {height}x{width} image"
        )
    return th, tw


def _too_large(path: Path, pixels: int, width: int | None = None, height: int | None = None) -> ValueError:
    size = f"{width}x{height} ({pixels / 1e6:.0f} megapixels)" if width else f"{pixels / 1e6:.0f} megapixels"
    return ValueError(
        f"{path}: reference image is {size}; expected at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels "
        "(a larger image would take gigabytes to decode, and is scaled down to --size anyway): downscale it first"
    )


def _open(source: str | Path) -> Image.Image:
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"reference image {path} does not exist")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's DecompressionBombWarning (a warning, then an error, at
            # PIL's process-wide MAX_IMAGE_PIXELS, which ComfyUI may change and we must not).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size  # from the header: nothing decoded yet
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_large(path, width * height, width, height)
                img.load()
                return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:  # refused by PIL at open(), before the size is known here
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, alpha dropped (upstream's ``convert('RGB')``)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        scale = 257 if arr.max(initial=0) > 255 else 1
        return Image.fromarray(np.clip(arr // scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _from_tensor(image: torch.Tensor) -> Image.Image:
    """ComfyUI IMAGE ``[B, H, W, C]`` / ``[H, W, C]`` float 0-1 -> PIL RGB (first image of a batch)."""
    x = image.detach().to("cpu", torch.float32)
    if x.dim() == 4:
        x = x[0]
    if x.dim() != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor [H, W, 3] (or [B, H, W, 3]) in 0..1, got {tuple(image.shape)}")
    x = x[..., :3] if x.shape[-1] != 1 else x.expand(*x.shape[:2], 3)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def to_pil(image: Any) -> Image.Image:
    """A path, a PIL image or a ComfyUI IMAGE tensor -> PIL RGB."""
    if isinstance(image, (str, Path)):
        return _to_rgb(_open(image))
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    raise ValueError(f"reference image must be a path, a PIL image or an IMAGE tensor, got {type(image).__name__}")


def resize_center_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """torchvision ``Resize(min(H, W))`` then ``CenterCrop((H, W))`` on a PIL image -> uint8 ``[H, W, 3]``."""
    w0, h0 = img.size
    short = min(height, width)
    if w0 <= h0:
        new_w, new_h = short, int(short * h0 / w0)
    else:
        new_w, new_h = int(short * w0 / h0), short
    if (new_w, new_h) != (w0, h0):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    pad_h, pad_w = max(0, height - new_h), max(0, width - new_w)
    if pad_h or pad_w:  # torchvision pads left/top with the floor half, right/bottom with the rest
        arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top = int(round((arr.shape[0] - height) / 2.0))
    left = int(round((arr.shape[1] - width) / 2.0))
    return arr[top:top + height, left:left + width]


def load_reference_image(image: Any, max_area: int | str) -> torch.Tensor:
    """Reference image (path / PIL / IMAGE tensor) -> float32 ``[3, H, W]`` in [-1, 1] at the budgeted size."""
    pil = to_pil(image)
    height, width = target_size(pil.height, pil.width, parse_size(max_area))
    pixels = torch.from_numpy(np.array(resize_center_crop(pil, height, width)))  # a writable copy
    return pixels.permute(2, 0, 1).to(torch.float32).div(255) * 2 - 1


__all__ = ["MAX_IMAGE_PIXELS", "SIZE_DIVISOR", "load_reference_image", "parse_size", "resize_center_crop", "target_size", "to_pil"]
