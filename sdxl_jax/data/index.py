"""Which records are usable and which bucket each belongs to: the scan of a raw source, the prepared index.

    ScanFilters      the rules a record must pass (header readable, size limits, caption policy)
    scan_source()    one pass over a raw source, reading image headers only -> BucketIndex + Report
    BucketIndex      record ids `[M]`, original sizes `[M, 2]` (h, w), bucket ids `[M]`, the bucket table
    Report           kept, skipped by reason, repaired by note, per-bucket counts (`report.json`)

A prepared dataset (`prepare`) stores its index as `index.json` (format, bucket spec and table,
shard names, counts) plus `index.npz` (`bucket` int16 `[N]`, `original_size` int32 `[N, 2]` for
record ids 0..N-1 in shard order), so the loader never touches an image to plan its batches.
"""

import collections
import dataclasses
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdxl_jax import storage
from sdxl_jax.data.buckets import Bucket, assign_buckets, bucket_table
from sdxl_jax.data.captions import EMPTY_CAPTION_POLICIES
from sdxl_jax.data.images import DEFAULT_MAX_PIXELS, BadImage, image_size

logger = logging.getLogger(__name__)

INDEX_FORMAT = "sdxl_jax.prepared"
INDEX_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ScanFilters:
    """max_pixels: header area above which an image is skipped as `too_large` (bomb guard).
    min_original_size: skip (`too_small`) images whose shorter side is below it; 0 upscales everything.
    empty_caption: "uncond" keeps caption-less images as unconditional examples, "skip" drops them."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_original_size: int = 0
    empty_caption: str = "uncond"

    def __post_init__(self):
        if self.empty_caption not in EMPTY_CAPTION_POLICIES:
            raise ValueError(f"empty_caption must be one of {EMPTY_CAPTION_POLICIES}, got {self.empty_caption!r}")


@dataclasses.dataclass
class Report:
    """Counts for the user: what was kept, skipped (by reason) and repaired (by note)."""

    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    repaired: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    buckets: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_json(self) -> dict:
        """`{"kept": N, "skipped": {reason: n}, "repaired": {note: n}, "buckets": {"WxH": n}}`."""
        return dict(
            kept=self.kept,
            skipped=dict(sorted(self.skipped.items())),
            repaired=dict(sorted(self.repaired.items())),
            buckets=dict(sorted(self.buckets.items())),
        )

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        repaired = ", ".join(f"{k} {v}" for k, v in sorted(self.repaired.items())) or "none"
        buckets = ", ".join(f"{k}: {v}" for k, v in sorted(self.buckets.items(), key=lambda kv: -kv[1]))
        return f"kept {self.kept}; skipped: {skipped}; repaired: {repaired}; buckets: {buckets or 'none'}"


@dataclasses.dataclass(frozen=True)
class BucketIndex:
    """The usable records of a source: ids into the source, their original sizes and buckets."""

    buckets: tuple[Bucket, ...]
    record_ids: np.ndarray  # int64 [M]
    original_size: np.ndarray  # int32 [M, 2] (h, w)
    bucket: np.ndarray  # int32 [M], index into `buckets`

    def __post_init__(self):
        m = len(self.record_ids)
        if self.original_size.shape != (m, 2) or self.bucket.shape != (m,):
            raise ValueError(
                f"index arrays disagree: {m} ids, sizes {self.original_size.shape}, buckets {self.bucket.shape}"
            )
        if m and (self.bucket.min() < 0 or self.bucket.max() >= len(self.buckets)):
            raise ValueError("bucket ids out of range of the bucket table")

    def __len__(self) -> int:
        return len(self.record_ids)

    def counts(self) -> np.ndarray:
        """`[K]` records per bucket."""
        return np.bincount(self.bucket, minlength=len(self.buckets))


def check_record(record, filters: ScanFilters) -> tuple[tuple[int, int] | None, str | None, list[str]]:
    """((h, w) or None, skip reason or None, repair notes) for one `RawRecord`."""
    try:
        size = image_size(record.image, filters.max_pixels)
    except BadImage as e:
        return None, e.reason, []
    if min(size) < filters.min_original_size:
        return None, "too_small", []
    notes = list(record.repairs)
    if not record.captions:
        if filters.empty_caption == "skip":
            return None, "no_caption", []
        notes.append("no_caption_uncond")
    return size, None, notes


def scan_source(
    source,
    buckets: tuple[Bucket, ...],
    filters: ScanFilters,
    progress: bool = False,
    too_long: Callable[[list[str]], bool] | None = None,
) -> tuple[BucketIndex, Report]:
    """Read every record's header (not its pixels) and caption; assign buckets; count what was skipped.

    too_long: optional test of a kept record's captions, counted as repaired "caption_truncated"
    (the tokenizer cuts them at 75 tokens); `prepare` passes one, the loader does not tokenize here.
    """
    report = Report()
    if getattr(source, "no_image", 0):  # tar keys with a caption/json but no image member
        report.skipped["missing_image"] += source.no_image
    ids, sizes = [], []
    records = range(len(source))
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc="scanning", unit="img")
    for i in records:
        try:
            record = source[i]
        except OSError as e:
            logger.warning("record %d: unreadable (%s); skipped", i, e)
            report.skipped["read_error"] += 1
            continue
        size, reason, notes = check_record(record, filters)
        if reason is not None:
            report.skipped[reason] += 1
            continue
        if too_long is not None and record.captions and too_long(record.captions):
            notes.append("caption_truncated")
        report.repaired.update(notes)
        ids.append(i)
        sizes.append(size)
    sizes = np.array(sizes, np.int32).reshape(-1, 2)
    bucket = assign_buckets(sizes, buckets) if len(sizes) else np.zeros(0, np.int32)
    index = BucketIndex(buckets, np.array(ids, np.int64), sizes, bucket)
    report.kept = len(index)
    report.buckets.update({buckets[k].name: int(n) for k, n in enumerate(index.counts()) if n})
    return index, report


# ---- the prepared dataset's index ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreparedIndex:
    """`index.json` + `index.npz` of a prepared dataset."""

    bucket_spec: str
    buckets: tuple[Bucket, ...]
    shards: tuple[str, ...]
    kind: str  # "images" or "latents"
    bucket: np.ndarray  # int32 [N]
    original_size: np.ndarray  # int32 [N, 2]

    @property
    def num_records(self) -> int:
        return len(self.bucket)

    def bucket_index(self) -> BucketIndex:
        return BucketIndex(self.buckets, np.arange(self.num_records, dtype=np.int64), self.original_size, self.bucket)


def save_prepared_index(root: Path, index: PreparedIndex, report: Report) -> None:
    """Write `index.npz`, then `index.json` (its presence marks a finished dataset)."""
    np.savez(
        root / "index.npz", bucket=index.bucket.astype(np.int16), original_size=index.original_size.astype(np.int32)
    )
    counts = np.bincount(index.bucket, minlength=len(index.buckets))
    meta = dict(format=INDEX_FORMAT, version=INDEX_VERSION, bucket_spec=index.bucket_spec,
                buckets=[b.name for b in index.buckets], shards=list(index.shards), kind=index.kind,
                num_records=index.num_records, counts={b.name: int(n) for b, n in zip(index.buckets, counts) if n},
                report=report.to_json())  # fmt: skip
    tmp = root / "index.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(root / "index.json")


def load_prepared_index(root: str | Path) -> PreparedIndex:
    root = storage.path(root)
    path = root / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a prepared dataset (no index.json; did `prepare` finish?)")
    meta = json.loads(path.read_text())
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: not a {INDEX_FORMAT} v{INDEX_VERSION} index")
    buckets = bucket_table(meta["bucket_spec"])
    if [b.name for b in buckets] != meta["buckets"]:
        raise ValueError(f"{path}: bucket spec {meta['bucket_spec']!r} now gives a different table than when prepared")
    with np.load(io.BytesIO((root / "index.npz").read_bytes())) as arrays:
        bucket, sizes = arrays["bucket"].astype(np.int32), arrays["original_size"].astype(np.int32)
    if len(bucket) != meta["num_records"]:
        raise ValueError(f"{root}: index.npz has {len(bucket)} records, index.json says {meta['num_records']}")
    return PreparedIndex(meta["bucket_spec"], buckets, tuple(meta["shards"]), meta["kind"], bucket, sizes)
