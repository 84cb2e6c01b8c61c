"""Encoded image bytes -> RGB uint8, robustly: header-only sizes, EXIF orientation, every PIL mode.

    image_size(data)           (h, w) as displayed (EXIF-rotated), from the header only
    decode_rgb(data, ...)      uint8 [H, W, 3], EXIF-rotated; `draft` lets JPEG decode at 1/2, 1/4, 1/8

Modes: L, LA, P (with or without transparency), RGBA, CMYK, 16-bit (I;16, I) and float grey all end
as RGB uint8; transparency is composited on white (what a viewer shows; black would invent dark
borders). Anything wrong raises `BadImage` with a short `reason` that reports count by:

    empty_file  not_an_image  too_large (header over max_pixels: decompression-bomb guard)  decode_error
"""

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Orientation tag values that swap height and width (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112
DEFAULT_MAX_PIXELS = 100_000_000  # ~10000²; bigger headers are bombs or scans, not training photos


class BadImage(ValueError):
    """An image that cannot be used; `reason` is one of the module docstring's names."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(data: bytes | str, max_pixels: int) -> Image.Image:
    """bytes, or a path (PIL then reads only the header until `load`)."""
    try:
        if not (os.path.getsize(data) if isinstance(data, str) else len(data)):
            raise BadImage("empty_file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd EXIF/ICC blocks that do not matter here
            img = Image.open(data if isinstance(data, str) else io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own guard, past 2 * Image.MAX_IMAGE_PIXELS
        raise BadImage("too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise BadImage("not_an_image", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadImage):
            raise
        raise BadImage("decode_error", str(e)) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage("decode_error", f"size {w}x{h}")
    if max_pixels and w * h > max_pixels:
        img.close()
        raise BadImage("too_large", f"{w}x{h} is over max_pixels={max_pixels}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: treat as unrotated, as most viewers do
        return 1


def image_size(data: bytes | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) of the image as displayed (after EXIF orientation), reading only the header.

    data: encoded bytes or a file path.
    """
    with _open(data, max_pixels) as img:
        w, h = img.size
        return (w, h) if _orientation(img) in _SWAPPING_ORIENTATIONS else (h, w)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (8 bits per channel), alpha composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, np.float64)
        # 16-bit PNGs open as I;16 or as I (32-bit) holding 0..65535; float images are taken as 0..1.
        peak = 1.0 if img.mode == "F" and arr.max(initial=0) <= 1.0 else 255.0 if arr.max(initial=0) <= 255 else 65535.0
        grey = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "La", "RGBa", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes | str, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None
) -> Image.Image:
    """Bytes -> an RGB PIL image as displayed (EXIF-rotated).

    draft: (h, w) the caller will resize to; a JPEG then decodes at the smallest of 1/1, 1/2, 1/4, 1/8
    scale that still covers it (libjpeg's DCT scaling: several times faster for large photos).
    """
    img = _open(data, max_pixels)
    orientation = _orientation(img)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped PIL's global: truncated files would pass as grey
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; sdxl_jax.data needs truncated images to fail")
    try:
        if draft is not None and img.format == "JPEG":
            dh, dw = draft
            if orientation in _SWAPPING_ORIENTATIONS:
                dh, dw = dw, dh  # draft works in stored orientation
            img.draft("RGB", (dw, dh))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        if rgb is not img:
            img.close()
        return rgb
    except BadImage:
        raise
    except Exception as e:  # truncated data, bad Huffman tables, broken PNG chunks, ...
        raise BadImage("decode_error", f"{type(e).__name__}: {e}") from None


def decode_rgb(data: bytes | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 `[H, W, 3]` as displayed."""
    return np.asarray(decode_image(data, max_pixels))


def encode_image(img: Image.Image, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """RGB image -> bytes; JPEG at 4:4:4 chroma (no colour bleeding at the crop's edges), or PNG."""
    out = io.BytesIO()
    if fmt == "jpeg":
        img.save(out, "JPEG", quality=quality, subsampling=0)
    elif fmt == "png":
        img.save(out, "PNG", compress_level=1)  # fast; these are intermediate files
    else:
        raise ValueError(f"image format must be 'jpeg' or 'png', got {fmt!r}")
    return out.getvalue()
