"""Batches into the step: the data source chosen by the config, and host arrays -> global arrays.

    data = make_data(config)                  # this process's iterator, get_state()/set_state()
    batch = global_batch(next(data), sharding)   # dict of jax.Arrays with the global batch size

Each process reads only its own rows of every global batch (`process_index` of `process_count`);
`jax.make_array_from_process_local_data` assembles the global arrays without copying between hosts.
"""

import jax
import ml_collections
import numpy as np

from sdxl_jax.data.loader import make_loader
from sdxl_jax.data.shapes import make_shapes_loader
from sdxl_jax.data.synthetic import make_synthetic

# config.data.source -> the iterator factory (all take the same keywords). The grain loader reads
# `source` itself to open a folder, tar shards, a TFDS dataset or prepared shards; "shapes" is the demo's
# procedural folder (written on first use).
DATA_SOURCES = {
    "synthetic": make_synthetic,
    "folder": make_loader,
    "tar": make_loader,
    "tfds": make_loader,
    "prepared": make_loader,
    "shapes": make_shapes_loader,
}


def make_data(config: ml_collections.ConfigDict):
    """This process's data iterator for `config.data` (the global batch size is `config.batch_size`)."""
    source = config.data.source
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data.source {source!r}; valid: {sorted(DATA_SOURCES)}")
    return DATA_SOURCES[source](
        config.data,
        seed=config.seed,
        global_batch_size=config.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """This process's rows `[B_local, ...]` of each entry -> global `[B_local * process_count, ...]` arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def bucket(local: dict[str, np.ndarray]) -> str:
    """The batch's bucket as 'HxW' (pixels; from the target size, the same for every row)."""
    h, w = np.asarray(local["target_size"])[0]
    return f"{h}x{w}"
