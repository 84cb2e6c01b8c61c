"""The training input pipeline on grain: source -> bucket plan -> per-example decode/crop -> batches.

    it = make_loader(data_config, seed=0, global_batch_size=256, process_index=jax.process_index(),
                     process_count=jax.process_count())
    batch = next(it)          # this host's slice of global batch 0: one bucket, numpy arrays

A batch (B = global_batch_size / process_count examples, all of one bucket (H, W)):

    images           uint8   [B, H, W, 3]  (scale to [-1, 1] on the device, inside the jitted step)
      or, from shards prepared with --cache_latents, instead of images:
    latent_moments   float32 [B, H/8, W/8, 8]  VAE posterior mean ‖ logvar, unscaled
    context          float32 [B, 77, 2048]     (refiner cache: [B, 77, 1280])
    pooled           float32 [B, 1280]
    ids_l, ids_g     int32   [B, 77]   `tokenizer.tokenize_pair` of the picked caption ("" if dropped)
    eot_l, eot_g     int32   [B]
    original_size    int32   [B, 2]  (h, w)        } SDXL micro-conditioning, see
    crop_top_left    int32   [B, 2]  (top, left)   } `transforms`
    target_size      int32   [B, 2]  (h, w) = the bucket
    drop_text        bool    [B]     caption dropout / no caption: zero the text conditioning
    aesthetic_score  float32 [B]     sidecar `aesthetic_score`/`aesthetic`, else the default
    record_id        int64   [B]     only with `record_ids=True` (tests, debugging)

Determinism: the bucket and records of every global batch are a function of (seed, step) only
(`batch_plan.BatchPlan`); each example's crop, flip, caption pick and dropout draw from an rng seeded by
(seed, step, slot in the global batch). So every host agrees on each step's shape without talking,
the union of the hosts' slices does not depend on the number of hosts, and the iterator state
(grain `get_state()/set_state()`, or Orbax via `grain.checkpoint.CheckpointSave/CheckpointRestore`)
restores exactly. The state's layout depends on `num_workers` (0 vs n > 0 differ): restore with the
same `num_workers` it was saved with. A record that fails to decode is replaced by a deterministic
stand-in from the same bucket and logged (warning, `sdxl_jax.data.loader`).

The data config (`default_data_config()`; an `ml_collections.ConfigDict`):

    source          "folder" | "tar" | "tfds" | "prepared"
    path            the image folder; the tar folder, file or glob; the prepared folder; TFDS data_dir ("" = default)
    tfds_name       TFDS: registered name ("coco_captions/2017") or a prepared TFDS dataset folder
    tfds_split      TFDS split, e.g. "train"
    image_feature   TFDS image feature ('/' for nesting)
    text_feature    TFDS text feature (text or a sequence of texts)
    caption_ext     folder: sidecar caption extension (".txt")
    buckets         bucket spec: "sdxl", "area=512[,step=64,min=256,max=1024,ratio=4]" or "WxH,WxH,..."
                    (`buckets.bucket_table`);
                    for prepared shards it must equal the spec they were prepared with
    random_crop     True: uniform crop offset; False: centre crop
    flip_prob       probability of a horizontal flip (0 = never)
    max_pixels      skip images whose header is larger (decompression-bomb guard)
    min_original_size  skip images whose shorter side is smaller; 0 upscales everything
    empty_caption   "uncond": caption-less images train as unconditional (drop_text); "skip"
    caption_dropout probability of dropping the caption (drop_text=True)
    shuffle_tags    shuffle comma-separated tags, keeping the first `keep_tags`
    keep_tags       tags kept in place by shuffle_tags
    default_aesthetic_score  when a record has none (refiner conditioning)
    remainder       "drop" | "carry": what happens to a bucket's last partial global batch (see `plan`)
    num_epochs      None: endless; else stop after this many epochs
    num_workers     grain worker processes (0: decode in this process, in `num_threads` threads); their
                    batches arrive through shared memory that each worker reuses (`shm_ring`)
    num_threads     decode threads per worker (batches in flight per worker)
    prefetch_batches  batches buffered per worker
    record_ids      add `record_id` to batches
"""

import dataclasses
import functools
import logging
import threading

import grain
import ml_collections
import numpy as np

from sdxl_jax.data.batch_plan import BatchPlan
from sdxl_jax.data.buckets import bucket_table, cover_size
from sdxl_jax.data.captions import pick_caption
from sdxl_jax.data.images import BadImage, decode_image
from sdxl_jax.data.index import BucketIndex, Report, ScanFilters, scan_source
from sdxl_jax.data.shm_ring import from_ring, to_ring
from sdxl_jax.data.sources import FolderSource, PreparedSource, TarSource, TfdsSource, tar_shards
from sdxl_jax.data.transforms import crop_to_bucket

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 8  # stand-ins tried for a record that fails to decode before giving up loudly
_ENDLESS_STEPS = 2**50


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with SDXL's ~1024² buckets; fields in the module docstring."""
    c = ml_collections.ConfigDict()
    c.source = "folder"
    c.path = ""
    c.tfds_name = ""
    c.tfds_split = "train"
    c.image_feature = "image"
    c.text_feature = "caption"
    c.caption_ext = ".txt"
    c.buckets = "sdxl"
    c.random_crop = True
    c.flip_prob = 0.0
    c.max_pixels = 100_000_000
    c.min_original_size = 0
    c.empty_caption = "uncond"
    c.caption_dropout = 0.1
    c.shuffle_tags = False
    c.keep_tags = 1
    c.default_aesthetic_score = 6.0
    c.remainder = "drop"
    c.num_epochs = ml_collections.config_dict.placeholder(int)
    c.num_workers = 2
    c.num_threads = 1
    c.prefetch_batches = 2
    c.record_ids = False
    return c


def open_source(cfg: ml_collections.ConfigDict):
    """The configured source object (see `sources`)."""
    if cfg.source == "folder":
        return FolderSource(cfg.path, cfg.caption_ext)
    if cfg.source == "tar":
        return TarSource(tar_shards(cfg.path))
    if cfg.source == "tfds":
        return TfdsSource(cfg.tfds_name, cfg.tfds_split, cfg.path or None, cfg.image_feature, cfg.text_feature)
    if cfg.source == "prepared":
        return PreparedSource(cfg.path)
    raise ValueError(f"data.source must be one of folder, tar, tfds, prepared; got {cfg.source!r}")


def filters_from_config(cfg: ml_collections.ConfigDict) -> ScanFilters:
    return ScanFilters(
        max_pixels=cfg.max_pixels, min_original_size=cfg.min_original_size, empty_caption=cfg.empty_caption
    )


class _QuietTruncation(logging.Filter):
    """Mutes the tokenizer's per-prompt truncation warning in loader threads only: long captions are
    routine in training data (prepare reports them), and a warning per example floods the logs."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "on", False)


_QUIET = _QuietTruncation()
logging.getLogger("sdxl_jax.tokenizer").addFilter(_QUIET)


def _tokens(text: str) -> dict:
    from sdxl_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()  # thread-safe first load
    _QUIET.active.on = True
    try:
        tok = tokenizer.tokenize_pair([text])
    finally:
        _QUIET.active.on = False
    return dict(ids_l=tok.ids_l[0], ids_g=tok.ids_g[0], eot_l=tok.eot_l[0], eot_g=tok.eot_g[0])


@dataclasses.dataclass
class ExampleFn:
    """Global example index (host-local stream position) -> one example dict. Picklable for workers."""

    source: object
    plan: BatchPlan
    original_size: np.ndarray  # int32 [len(source), 2], by source record id
    cfg: dict  # the data config as a plain dict
    seed: int
    local_batch_size: int
    process_index: int

    def __call__(self, i: int) -> dict:
        step, local = divmod(int(i), self.local_batch_size)
        slot = self.process_index * self.local_batch_size + local
        bucket_id, record_id = self.plan.record(step, slot)
        rng = np.random.default_rng([self.seed, step, slot])
        for attempt in range(_MAX_ATTEMPTS):
            try:
                return self.example(record_id, bucket_id, rng)
            except BadImage as e:
                logger.warning("record %d failed to load (%s); using a stand-in from the same bucket", record_id, e)
                record_id = self.plan.substitute(bucket_id, step, slot, attempt)
        raise RuntimeError(
            f"{_MAX_ATTEMPTS} records of bucket {bucket_id} failed to load in a row at step {step}: "
            "is the source broken? (run `prepare` to check every image)"
        )

    def example(self, record_id: int, bucket_id: int, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        bucket = self.plan_buckets[bucket_id]
        record = self.source[record_id]
        if isinstance(record, dict) and "latent_moments" in record:
            return self._latent_example(record, record_id, bucket, rng)
        if isinstance(record, dict):  # prepared image record: already cover-sized
            data, captions, aesthetic = record["image"], record["captions"], record["aesthetic"]
            original = tuple(int(v) for v in record["original_size"])
        else:
            data, captions, aesthetic = record.image, record.captions, record.aesthetic
            original = tuple(int(v) for v in self.original_size[record_id])
        img = decode_image(data, cfg["max_pixels"], draft=cover_size(*original, bucket))
        crop = crop_to_bucket(img, original, bucket, rng, cfg["random_crop"], cfg["flip_prob"])
        text, drop = pick_caption(captions, rng, cfg["caption_dropout"], cfg["shuffle_tags"], cfg["keep_tags"])
        out = dict(images=crop.pixels, **_tokens(text))
        return self._finish(out, crop.original_size, crop.crop_top_left, bucket, drop, aesthetic, record_id)

    def _latent_example(self, record: dict, record_id: int, bucket, rng: np.random.Generator) -> dict:
        drop = (
            bool(self.cfg["caption_dropout"] > 0 and rng.random() < self.cfg["caption_dropout"])
            or not record["captions"]
        )
        token_keys = ("ids_l", "ids_g", "eot_l", "eot_g")
        tokens = _tokens("") if drop else {k: np.asarray(record[k]).astype(np.int32) for k in token_keys}
        out = dict(latent_moments=record["latent_moments"].astype(np.float32),
                   context=record["context"].astype(np.float32), pooled=record["pooled"].astype(np.float32),
                   **tokens)  # fmt: skip
        return self._finish(
            out, record["original_size"], record["crop_top_left"], bucket, drop, record["aesthetic"], record_id
        )

    def _finish(self, out, original, crop_top_left, bucket, drop, aesthetic, record_id) -> dict:
        score = self.cfg["default_aesthetic_score"] if aesthetic is None else aesthetic
        out |= dict(original_size=np.asarray(original, np.int32), crop_top_left=np.asarray(crop_top_left, np.int32),
                    target_size=np.array([bucket.h, bucket.w], np.int32), drop_text=np.bool_(drop),
                    aesthetic_score=np.float32(score))  # fmt: skip
        if self.cfg["record_ids"]:
            out["record_id"] = np.int64(record_id)
        return out

    @functools.cached_property
    def plan_buckets(self):
        return bucket_table(self.cfg["buckets"])


@dataclasses.dataclass
class Pipeline:
    """What `build_pipeline` made: the grain dataset and what it was planned from."""

    dataset: grain.IterDataset
    plan: BatchPlan
    index: BucketIndex
    report: Report
    local_batch_size: int
    example_fn: ExampleFn


def index_source(cfg: ml_collections.ConfigDict, source) -> tuple[BucketIndex, Report]:
    """The bucket index: read from a prepared dataset, or scanned from a raw source's headers."""
    buckets = bucket_table(cfg.buckets)
    if isinstance(source, PreparedSource):
        if source.index.bucket_spec != cfg.buckets:
            raise ValueError(
                f"{cfg.path} was prepared with buckets {source.index.bucket_spec!r}, "
                f"but the data config asks for {cfg.buckets!r}"
            )
        report = Report(kept=source.index.num_records)
        return source.index.bucket_index(), report
    return scan_source(source, buckets, filters_from_config(cfg))


def build_pipeline(
    data_config: ml_collections.ConfigDict,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Pipeline:
    """The grain pipeline for this host (see the module docstring); `make_loader` iterates it."""
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} does not split over {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    cfg = data_config
    source = open_source(cfg)
    index, report = index_source(cfg, source)
    logger.info("data %s %s: %s", cfg.source, cfg.path or cfg.tfds_name, report.summary())
    if len(index) == 0:
        raise ValueError(f"no usable records in {cfg.source} {cfg.path or cfg.tfds_name}: {report.summary()}")
    plan = BatchPlan(
        index.bucket, index.record_ids, len(index.buckets), global_batch_size, seed, cfg.remainder, cfg.num_epochs
    )
    sizes = np.zeros((len(source), 2), np.int32)
    sizes[index.record_ids] = index.original_size
    local = global_batch_size // process_count
    fn = ExampleFn(source, plan, sizes, cfg.to_dict(), seed, local, process_index)
    steps = plan.num_steps if plan.num_steps is not None else _ENDLESS_STEPS
    if steps == 0:
        raise ValueError(
            f"{cfg.num_epochs} epoch(s) of {len(index)} records hold no global batch of {global_batch_size}"
        )
    ds = grain.MapDataset.range(steps * local).map(fn).batch(local, drop_remainder=True)
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_batches)
    ds = ds.to_iter_dataset(read)
    if cfg.num_workers > 0:
        _allow_grain_workers()
        ds = (
            ds.map(to_ring)
            .mp_prefetch(
                grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=cfg.prefetch_batches)
            )
            .map(from_ring)
        )
    return Pipeline(ds, plan, index, report, local, fn)


def make_loader(
    data_config: ml_collections.ConfigDict,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """An iterator over this host's batches (dicts of numpy arrays, see the module docstring).

    Checkpoint it with `get_state()`/`set_state()`, or with Orbax:
    `ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))` to save and
    `grain.checkpoint.CheckpointRestore(it)` to restore. Close it (`it.close()`) to stop workers.
    """
    pipeline = build_pipeline(
        data_config,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(pipeline.dataset)


def _allow_grain_workers() -> None:
    """grain 0.2's worker processes read absl flags; when the program never parsed them (tests,
    notebooks, scripts without absl.app) mark them parsed, or the workers fail on first access."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
