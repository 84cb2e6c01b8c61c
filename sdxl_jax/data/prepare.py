"""Raw images -> bucketed ArrayRecord shards the loader reads fast (and, optionally, cached latents).

    python -m sdxl_jax.data.prepare SRC OUT [--buckets sdxl|area=512|1024x1024,...] [--num_shards N]
        [--cache_latents --checkpoint PATH] [--image_format jpeg|png] [--min_original_size N] ...

SRC: an image folder, a folder / file / glob of WebDataset `.tar` shards, or `tfds:NAME[:SPLIT]`
(NAME a registered TFDS name or a prepared TFDS folder; `--tfds_data_dir`, `--image_feature`,
`--text_feature`); folders and tars may be in a bucket. OUT: a folder, or a `gs://` URL (staged in a
local temporary folder, each file uploaded when finished: `Output`). Steps, each visible in the
progress bar and resumable:

1. scan: every record's image header (never its pixels) and caption -> bucket, or a skip reason.
   Saved as OUT/scan.npz; a re-run reuses it.
2. shards: kept records, in source order, are cut into `num_shards` contiguous shards. Each record
   is decoded, resized to cover its bucket and re-encoded (JPEG q95 4:4:4 by default), so training
   only crops; with `--cache_latents` the centre crop's VAE posterior and the caption's text
   encodings are stored instead of pixels (`latent_cache`). A shard is written to a temporary name
   and renamed, then its record list `shard-*.json` marks it done: a re-run skips done shards.
3. index: `index.json` + `index.npz` (bucket and original size per record, counts per bucket) and
   `report.json`: `{"kept": N, "skipped": {reason: n}, "repaired": {note: n}, "buckets": {"WxH": n}}`.

Bad records never stop the run: they are skipped by reason (`index.scan_source`, plus `decode_error`
for images whose header was fine but whose data is not) or repaired and counted (`caption_not_utf8`,
`no_caption_uncond`, `caption_truncated` past 75 tokens).
"""

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from sdxl_jax import storage
from sdxl_jax.data.buckets import bucket_table, cover_size
from sdxl_jax.data.captions import pick_caption
from sdxl_jax.data.images import BadImage, decode_image, encode_image
from sdxl_jax.data.index import BucketIndex, PreparedIndex, Report, ScanFilters, save_prepared_index, scan_source
from sdxl_jax.data.records import encode_record
from sdxl_jax.data.sources import FolderSource, TarSource, TfdsSource, tar_shards
from sdxl_jax.data.transforms import crop_to_bucket, resize_to_cover

logger = logging.getLogger(__name__)

RECORDS_PER_SHARD = 2048  # default shard size: big enough for sequential reads, small enough to resume


def open_raw_source(src: str, args: argparse.Namespace):
    """SRC -> a raw source (see the module docstring)."""
    if src.startswith("tfds:"):
        name, _, split = src[len("tfds:") :].partition(":")
        return TfdsSource(name, split or "train", args.tfds_data_dir, args.image_feature, args.text_feature)
    path = storage.path(src)  # raw images may be in a bucket; the shards are written locally
    if path.is_dir() and not any(path.glob("*.tar")):
        return FolderSource(path, args.caption_ext)
    return TarSource(tar_shards(path))


def _shard_name(s: int, n: int) -> str:
    return f"shard-{s:05d}-of-{n:05d}"


def _settings(args: argparse.Namespace) -> dict:
    """What the output depends on; a re-run with different settings must not mix into it."""
    keys = (
        "src",
        "buckets",
        "num_shards",
        "cache_latents",
        "checkpoint",
        "image_format",
        "jpeg_quality",
        "max_pixels",
        "min_original_size",
        "empty_caption",
        "caption_seed",
    )
    return {k: getattr(args, k) for k in keys}


def _check_settings(out: Path, args: argparse.Namespace) -> None:
    path = out / "prepare.json"
    settings = _settings(args)
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise SystemExit(f"{args.out} was prepared with other settings {diff} (before, now); use a new OUT")
    else:
        path.write_text(json.dumps(settings, indent=1))


def scan(out: Path, source, args: argparse.Namespace) -> tuple[BucketIndex, Report]:
    """Step 1, or its saved result."""
    buckets = bucket_table(args.buckets)
    saved = out / "scan.npz"
    if saved.is_file():
        with np.load(saved) as a:
            index = BucketIndex(buckets, a["record_ids"], a["original_size"], a["bucket"])
        raw = json.loads((out / "scan.json").read_text())
        report = Report(raw["kept"])
        for field in ("skipped", "repaired", "buckets"):
            getattr(report, field).update(raw[field])
        return index, report
    filters = ScanFilters(args.max_pixels, args.min_original_size, args.empty_caption)
    index, report = scan_source(
        source, buckets, filters, progress=not args.quiet, too_long=_too_long if args.count_truncated else None
    )
    np.savez(out / "scan.tmp.npz", record_ids=index.record_ids, original_size=index.original_size, bucket=index.bucket)
    (out / "scan.json").write_text(json.dumps(report.to_json()))
    (out / "scan.tmp.npz").replace(saved)
    return index, report


def _too_long(captions: list[str]) -> bool:
    """Whether any caption is longer than one 75-token row (the tokenizer will cut it)."""
    from sdxl_jax.tokenizer import CHUNK_LENGTH, load_tokenizer

    return any(len(ids) > CHUNK_LENGTH for ids in load_tokenizer().encode(captions))


class ShardWriter:
    """One ArrayRecord shard, written under a temporary name and renamed when complete."""

    def __init__(self, path: Path):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.writer = ArrayRecordWriter(str(self.tmp), "group_size:1")  # one record per chunk: random access
        self.entries: list[dict] = []

    def write(self, record: dict, entry: dict) -> None:
        self.writer.write(encode_record(record))
        self.entries.append(entry)

    def close(self) -> None:
        self.writer.close()
        self.tmp.replace(self.path)


def _image_record(raw, original, bucket, args) -> dict:
    img = decode_image(raw.image, args.max_pixels, draft=cover_size(*original, bucket))
    img = resize_to_cover(img, original, bucket)
    return dict(key=raw.key, image=encode_image(img, args.image_format, args.jpeg_quality), captions=raw.captions,
                original_size=list(original), bucket=bucket.name, aesthetic=raw.aesthetic)  # fmt: skip


def write_shard(s: int, positions: range, index: BucketIndex, source, args, encoder, progress, out: Path) -> dict:
    """Step 2 for shard `s`, the kept records at `positions` of the scan -> its record list and skip
    counts (also saved as shard-*.json in `out`, which marks the shard done)."""
    name = _shard_name(s, args.num_shards)
    writer = ShardWriter(out / f"{name}.array_record")
    skipped: dict[str, int] = {}

    def flush(bucket_id, items):  # latents: one micro-batch (rid, raw, crop, text) of one bucket
        enc = encoder.encode(np.stack([it[2].pixels for it in items]), [it[3] for it in items])
        for j, (rid, raw, crop, text) in enumerate(items):
            record = {k: np.asarray(v[j]) for k, v in enc.items()} | dict(
                key=raw.key,
                captions=[text] if text else [],
                original_size=list(crop.original_size),
                crop_top_left=list(crop.crop_top_left),
                bucket=index.buckets[bucket_id].name,
                aesthetic=raw.aesthetic,
            )
            writer.write(record, dict(record_id=rid, bucket=bucket_id, original_size=list(crop.original_size)))

    batcher = None
    if encoder is not None:
        from sdxl_jax.data.latent_cache import BucketBatcher

        batcher = BucketBatcher(encoder.batch_size, flush)
    for k in positions:
        rid = int(index.record_ids[k])
        original, bucket_id = tuple(int(v) for v in index.original_size[k]), int(index.bucket[k])
        bucket = index.buckets[bucket_id]
        raw = source[rid]
        try:
            if batcher is None:
                entry = dict(record_id=rid, bucket=bucket_id, original_size=list(original))
                writer.write(_image_record(raw, original, bucket, args), entry)
            else:
                img = decode_image(raw.image, args.max_pixels, draft=cover_size(*original, bucket))
                crop = crop_to_bucket(img, original, bucket, np.random.default_rng(0), random_crop=False)
                text, _ = pick_caption(raw.captions, np.random.default_rng([args.caption_seed, rid]), 0.0, False, 0)
                batcher.add(bucket_id, (rid, raw, crop, text))
        except BadImage as e:
            logger.warning("%s: %s; skipped", raw.key, e)
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
        progress.update(1)
    if batcher is not None:
        batcher.finish()
    writer.close()
    done = dict(records=writer.entries, skipped=skipped)
    (out / f"{name}.json").write_text(json.dumps(done))
    return done


def build_index(out: Path, index: BucketIndex, report: Report, args, shards: list[dict]) -> Report:
    """Step 3: the prepared index and the final report."""
    names, bucket, sizes = [], [], []
    final = Report(repaired=report.repaired.copy(), skipped=report.skipped.copy())
    for s, done in enumerate(shards):
        final.skipped.update(done["skipped"])
        if done["records"]:
            names.append(f"{_shard_name(s, args.num_shards)}.array_record")
            bucket += [e["bucket"] for e in done["records"]]
            sizes += [e["original_size"] for e in done["records"]]
    bucket = np.array(bucket, np.int32)
    final.kept = len(bucket)
    counts = np.bincount(bucket, minlength=len(index.buckets))
    final.buckets.update({index.buckets[b].name: int(n) for b, n in enumerate(counts) if n})
    kind = "latents" if args.cache_latents else "images"
    prepared = PreparedIndex(
        args.buckets, index.buckets, tuple(names), kind, bucket, np.array(sizes, np.int32).reshape(-1, 2)
    )
    (out / "report.json").write_text(json.dumps(final.to_json(), indent=1))
    save_prepared_index(out, prepared, final)
    return final


class Output:
    """Where `prepare` writes: OUT itself, or for a bucket (`gs://...`) a local staging folder whose files
    are uploaded as each is finished (a shard, then the record list that marks it done; the index last),
    so a re-run resumes from what the bucket holds and readers never see a shard without its data."""

    def __init__(self, location: str):
        checked = storage.path(location)  # refuses `gs:/x` and unknown schemes
        self.remote = checked if storage.is_remote(checked) else None
        if self.remote is not None:
            if not str(checked).startswith("gs://"):
                raise storage.StorageError(f"{checked}: prepared shards are read from local disks and gs:// only")
            storage.check_writable(self.remote, "prepare's OUT")
            self.local = Path(tempfile.mkdtemp(prefix="sdxl_prepare_"))
        else:
            self.local = Path(location)
            self.local.mkdir(parents=True, exist_ok=True)

    def has(self, name: str) -> bool:
        return ((self.remote or self.local) / name).exists()

    def fetch(self, *names: str) -> None:
        """Copy these (small) files from the bucket into the staging folder, where present."""
        for name in names if self.remote is not None else ():
            if (self.remote / name).exists():
                (self.local / name).write_bytes((self.remote / name).read_bytes())

    def publish(self, *names: str, drop: bool = False) -> None:
        """Upload these staged files, in order; `drop`: then delete them here (shards: disk space)."""
        for name in names if self.remote is not None else ():
            with open(self.local / name, "rb") as src, (self.remote / name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
            if drop:
                (self.local / name).unlink()

    def close(self) -> None:
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


def prepare(args: argparse.Namespace) -> Report:
    """The whole run (see the module docstring); returns the final report."""
    from tqdm import tqdm

    if args.cache_latents and not args.checkpoint:
        raise SystemExit("--cache_latents needs --checkpoint PATH (the VAE and text encoders)")
    source = open_raw_source(args.src, args)
    if args.num_shards is None:  # before the settings check: it is part of them
        n = len(source)
        args.num_shards = max(1, math.ceil(n / RECORDS_PER_SHARD))
    output = Output(args.out)
    out = output.local
    try:
        output.fetch("prepare.json", "scan.npz", "scan.json")
        _check_settings(out, args)
        output.publish("prepare.json")
        index, report = scan(out, source, args)
        output.publish("scan.json", "scan.npz")  # scan.npz marks the scan done: last
        encoder = None
        if args.cache_latents:
            from sdxl_jax.data.latent_cache import LatentEncoder

            encoder = LatentEncoder(args.checkpoint, args.batch_size)
        bounds = [len(index) * s // args.num_shards for s in range(args.num_shards + 1)]
        shards = []
        with tqdm(total=len(index), desc="writing", unit="img", disable=args.quiet) as progress:
            for s in range(args.num_shards):
                name = _shard_name(s, args.num_shards)
                output.fetch(f"{name}.json")
                if (out / f"{name}.json").is_file() and output.has(f"{name}.array_record"):
                    shards.append(json.loads((out / f"{name}.json").read_text()))
                    progress.update(bounds[s + 1] - bounds[s])
                    continue
                positions = range(bounds[s], bounds[s + 1])
                shards.append(write_shard(s, positions, index, source, args, encoder, progress, out))
                output.publish(f"{name}.array_record", drop=True)
                output.publish(f"{name}.json")
        final = build_index(out, index, report, args, shards)
        output.publish("index.npz", "report.json", "index.json")  # index.json marks a finished dataset
    finally:
        output.close()
    print(final.summary(), file=sys.stderr)
    return final


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.data.prepare",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="image folder, .tar shard(s) (folder, file or glob), or tfds:NAME[:SPLIT]")
    p.add_argument("out", help="output folder or gs:// URL (created; re-running continues an unfinished run)")
    p.add_argument(
        "--buckets", default="sdxl", help="'sdxl', 'area=512[,step=64,min=..,max=..,ratio=..]' or 'WxH,WxH,..'"
    )
    p.add_argument("--num_shards", type=int, default=None, help=f"default: one per {RECORDS_PER_SHARD} records")
    p.add_argument("--cache_latents", action="store_true", help="store VAE latents + text encodings, not pixels")
    p.add_argument(
        "--checkpoint", default=None, help="SDXL weights for --cache_latents (any format load_pipeline_weights reads)"
    )
    p.add_argument("--batch_size", type=int, default=4, help="--cache_latents micro-batch")
    p.add_argument("--caption_seed", type=int, default=0, help="--cache_latents: seeds the pick among several captions")
    p.add_argument("--image_format", default="jpeg", choices=("jpeg", "png"))
    p.add_argument("--jpeg_quality", type=int, default=95)
    p.add_argument("--max_pixels", type=int, default=100_000_000)
    p.add_argument("--min_original_size", type=int, default=0)
    p.add_argument("--empty_caption", default="uncond", choices=("uncond", "skip"))
    p.add_argument("--caption_ext", default=".txt")
    p.add_argument("--tfds_data_dir", default=None)
    p.add_argument("--image_feature", default="image")
    p.add_argument("--text_feature", default="caption")
    p.add_argument(
        "--count_truncated",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tokenize captions during the scan to report those past 75 tokens",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepare(parse_args(argv))
    except (storage.StorageError, FileNotFoundError) as e:  # a bad SRC or OUT: one line, exit 1
        raise SystemExit(f"prepare: error: {e}") from None


if __name__ == "__main__":
    main()
