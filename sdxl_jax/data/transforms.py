"""An image and its bucket -> the training crop and its micro-conditioning.

    original (h, w) --cover resize--> (ch, cw) --crop (top, left)--> bucket (bh, bw) --optional h-flip-->

The values handed to the model (SDXL paper, section 2.2):

    original_size  (h, w) of the source image as displayed (EXIF-rotated), before any resize
    crop_top_left  (top, left) of the crop in the cover-resized image's pixels; after a horizontal
                   flip, `left` is measured in the flipped image (cw - bw - left), so the pair
                   describes exactly the pixels the model sees
    target_size    (bh, bw), the bucket

Small images are scaled up to cover the bucket (original_size tells the model they were small).
The resize samples only the source region under the crop (PIL's `box`): the crop is computed in
cover coordinates first, so the result equals resize-then-crop up to edge filtering, at a fraction
of the cost for wide or tall images.
"""

from typing import NamedTuple

import numpy as np
from PIL import Image

from sdxl_jax.data.buckets import Bucket, cover_size, crop_offset, flipped_offset

_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 2.0  # PIL first reduces by whole factors, then filters the last <= 2x: fast, near-exact


class Crop(NamedTuple):
    """One training example's pixels and micro-conditioning (see the module docstring)."""

    pixels: np.ndarray  # uint8 [bh, bw, 3]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def choose_crop(
    original_size: tuple[int, int], bucket: Bucket, rng: np.random.Generator, random_crop: bool, flip_prob: float
) -> tuple[tuple[int, int], int, int, bool]:
    """(cover size, top, left, flip) for one example; `left` is in the unflipped cover image.

    Randomness is drawn in a fixed order (crop, then flip) so a given rng state gives a given crop.
    """
    cover = cover_size(*original_size, bucket)
    top, left = crop_offset(cover, bucket, rng if random_crop else None)
    flip = bool(flip_prob > 0 and rng.random() < flip_prob)
    return cover, top, left, flip


def crop_to_bucket(
    img: Image.Image,
    original_size: tuple[int, int],
    bucket: Bucket,
    rng: np.random.Generator,
    random_crop: bool = True,
    flip_prob: float = 0.0,
) -> Crop:
    """A decoded RGB image (at any resolution with the original's aspect, e.g. a JPEG draft) -> `Crop`.

    `original_size` is the source's displayed (h, w); `img` may be smaller (decoded at 1/2^k) or
    already cover-sized (prepared shards), in which case no resampling happens at all.
    """
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    cover, top, left, flip = choose_crop(original_size, bucket, rng, random_crop, flip_prob)
    if (img.height, img.width) == cover:  # crop in numpy: one copy fewer than PIL's crop
        pixels = np.asarray(img, np.uint8)[top : top + bucket.h, left : left + bucket.w]
    else:
        sy, sx = img.height / cover[0], img.width / cover[1]  # source pixels per cover pixel
        box = (left * sx, top * sy, (left + bucket.w) * sx, (top + bucket.h) * sy)
        pixels = np.asarray(img.resize((bucket.w, bucket.h), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP), np.uint8)
    if flip:
        pixels = pixels[:, ::-1]
        left = flipped_offset(cover[1], bucket, left)
    return Crop(np.ascontiguousarray(pixels), tuple(original_size), (top, left), (bucket.h, bucket.w))


def resize_to_cover(img: Image.Image, original_size: tuple[int, int], bucket: Bucket) -> Image.Image:
    """The whole image at its cover size (what `prepare` stores, so training only crops)."""
    cover = cover_size(*original_size, bucket)
    if (img.height, img.width) == cover:
        return img
    return img.resize((cover[1], cover[0]), _RESAMPLE, reducing_gap=_REDUCING_GAP)
