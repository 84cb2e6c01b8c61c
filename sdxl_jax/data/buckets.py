"""Aspect-ratio buckets: SDXL's ~1024² table, a generator for other areas, assignment, cover and crop.

A bucket is a target size `Bucket(h, w)` (pixels, both multiples of the side step). Every training
batch is drawn from one bucket, so images keep their aspect ratio and the bucket is the
`target_size` condition. An image of original size (h, w) goes to the bucket whose aspect ratio is
nearest in log space (|log(h/w) - log(bh/bw)|), is resized so it *covers* the bucket (the shorter
relative side matches, nothing is padded), and is cropped to the bucket:

    original (h, w) --resize--> cover (ch, cw) >= bucket --crop at (top, left)--> bucket (bh, bw)

`crop_top_left` is in the resized image's pixels, as SDXL's micro-conditioning expects.

Bucket tables are named by a spec string (the `buckets` field of the data config, `prepare --buckets`):

    "sdxl"                                 SDXL's 26 sizes at ~1024² (sgm's list)
    "area=512"                             generated: sides step 64, area <= 512², aspect <= 4
    "area=256,step=32,min=128,max=1024,ratio=2"
    "24x24,32x24,24x32"                    listed: each size as SDXL's tables name them, WxH
"""

import math
from typing import NamedTuple

import numpy as np


class Bucket(NamedTuple):
    """A target size in pixels, height first like every size in this package."""

    h: int
    w: int

    @property
    def name(self) -> str:
        """ "WxH", the form SDXL's tables and `report.json` use."""
        return f"{self.w}x{self.h}"


# sgm's demo list of (width, height), SDXL's multi-aspect fine-tuning buckets.
_SDXL_WH = (
    (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
    (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832),
    (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640),
    (1664, 576), (1728, 576),
)  # fmt: skip


def _by_aspect(buckets) -> tuple[Bucket, ...]:
    """Sorted tallest first (descending h/w), so a table's order does not depend on how it was built."""
    return tuple(sorted(set(buckets), key=lambda b: (-b.h / b.w, b.h)))


SDXL_BUCKETS: tuple[Bucket, ...] = _by_aspect(Bucket(h, w) for w, h in _SDXL_WH)


def generate_buckets(
    area: int, step: int = 64, min_side: int | None = None, max_side: int | None = None, max_ratio: float = 4.0
) -> tuple[Bucket, ...]:
    """Sizes with both sides multiples of `step` in [min_side, max_side] and h * w <= area: for each
    height the widest width that fits (and the transpose), keeping aspect ratios <= max_ratio.

    Defaults: min_side = area**0.5 / 2 rounded down to the step, max_side = area**0.5 * 2.
    `generate_buckets(256**2)` gives 256x256 plus 128x512 .. 512x128 style sizes for pretraining stages.
    """
    side = math.isqrt(area)
    min_side = min_side if min_side is not None else max(step, side // 2 // step * step)
    max_side = max_side if max_side is not None else 2 * side
    if step <= 0 or min_side <= 0 or min_side % step or min_side > max_side:
        raise ValueError(f"bad bucket bounds: step={step}, min_side={min_side}, max_side={max_side}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    found = set()
    for h in range(min_side, max_side + 1, step):
        w = min(area // h // step * step, max_side // step * step)
        if w < min_side or max(h, w) / min(h, w) > max_ratio:
            continue
        found |= {Bucket(h, w), Bucket(w, h)}
    if not found:
        raise ValueError(
            f"no bucket fits area={area}, step={step}, sides [{min_side}, {max_side}], ratio <= {max_ratio}"
        )
    return _by_aspect(found)


def bucket_table(spec: str) -> tuple[Bucket, ...]:
    """A table from its spec string (see the module docstring)."""
    if spec == "sdxl":
        return SDXL_BUCKETS
    if "=" not in spec:
        return listed_buckets(spec)
    keys = dict(area="area", step="step", min="min_side", max="max_side", ratio="max_ratio")
    fields = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in keys or not value:
            raise ValueError(f"bucket spec {spec!r}: expected 'sdxl' or 'area=N[,step=N,min=N,max=N,ratio=X]'")
        fields[keys[key.strip()]] = float(value) if key.strip() == "ratio" else int(value)
    if "area" not in fields:
        raise ValueError(f"bucket spec {spec!r} has no area=")
    side = fields.pop("area")
    return generate_buckets(side * side, **fields)  # "area=512" means 512², the way stages are named


def config_buckets(buckets) -> tuple[Bucket, ...]:
    """A data config's `buckets` field as a table: a spec string (the folder loaders') or `(h, w)` pairs
    (the synthetic source's)."""
    if isinstance(buckets, str):
        return bucket_table(buckets)
    return tuple(Bucket(int(h), int(w)) for h, w in buckets)


def largest_bucket(buckets) -> Bucket:
    """The bucket of most pixels, the one that needs the most memory; of equal ones the squarest (the
    stage's nominal size: 256x256 of "area=256", not 128x512)."""
    return max(buckets, key=lambda b: (b.h * b.w, -abs(math.log(b.h / b.w))))


def listed_buckets(spec: str) -> tuple[Bucket, ...]:
    """ "WxH,WxH,...": exactly these sizes (positive, no repeats)."""
    sizes = []
    for part in spec.split(","):
        w, _, h = part.strip().partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) <= 0 or int(h) <= 0:
            raise ValueError(
                f"bucket spec {spec!r}: expected 'sdxl', 'area=N[,...]' or 'WxH,WxH,...'; "
                f"{part!r} is not WxH with positive integer sides"
            )
        sizes.append(Bucket(int(h), int(w)))
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"bucket spec {spec!r} lists a size twice")
    return _by_aspect(sizes)


def log_aspects(buckets) -> np.ndarray:
    """`[K]` float64 log(h / w) of each bucket."""
    return np.log(np.array([b.h / b.w for b in buckets], np.float64))


def assign_buckets(sizes: np.ndarray, buckets) -> np.ndarray:
    """Original sizes `[N, 2]` (h, w) -> int32 `[N]` index of the nearest bucket by log aspect ratio.

    Ties go to the bucket listed first (the taller one).
    """
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    if (sizes <= 0).any():
        raise ValueError("image sizes must be positive")
    aspect = np.log(sizes[:, 0] / sizes[:, 1])
    return np.argmin(np.abs(aspect[:, None] - log_aspects(buckets)[None, :]), axis=1).astype(np.int32)


def assign_bucket(h: int, w: int, buckets) -> int:
    """Index of the nearest bucket for one (h, w)."""
    return int(assign_buckets(np.array([[h, w]]), buckets)[0])


def cover_size(h: int, w: int, bucket: Bucket) -> tuple[int, int]:
    """The (h, w) an image is resized to so that it covers `bucket`: aspect kept (to rounding), one side
    equal to the bucket's and the other at least the bucket's. Small images are scaled up."""
    scale = max(bucket.h / h, bucket.w / w)
    return max(bucket.h, round(h * scale)), max(bucket.w, round(w * scale))


def crop_offset(cover: tuple[int, int], bucket: Bucket, rng: np.random.Generator | None) -> tuple[int, int]:
    """(top, left) of the bucket-sized crop inside the cover-sized image: uniform if `rng`, else centred."""
    slack_h, slack_w = cover[0] - bucket.h, cover[1] - bucket.w
    if slack_h < 0 or slack_w < 0:
        raise ValueError(f"image {cover} does not cover bucket {bucket}")
    if rng is None:
        return slack_h // 2, slack_w // 2
    return int(rng.integers(0, slack_h + 1)), int(rng.integers(0, slack_w + 1))


def flipped_offset(cover_w: int, bucket: Bucket, left: int) -> int:
    """The crop's left offset measured in the horizontally flipped image (the crop mirrored)."""
    return cover_w - bucket.w - left
