"""The input pipeline: images -> aspect buckets -> micro-conditioned, tokenized batches (grain).

buckets     bucket tables, assignment, cover-resize and crop geometry
images      decode any image to RGB uint8 (EXIF, modes, bomb guard)
transforms  crop to the bucket, flip, micro-conditioning values
captions    sidecar captions: pick, shuffle tags, dropout
sources     image folder, WebDataset tars, TFDS, prepared shards
index       header scan, skip reasons, the prepared index
batch_plan  the deterministic global batch schedule (seed, epoch) -> buckets and records
shm_ring    worker processes' batches to the trainer through shared memory each worker reuses
loader      `make_loader(data_config, ...)`, `default_data_config()`
prepare     `python -m sdxl_jax.data.prepare SRC OUT`: ArrayRecord shards (+ cached latents)
"""

from sdxl_jax.data.loader import build_pipeline, default_data_config, make_loader

__all__ = ["build_pipeline", "default_data_config", "make_loader"]
