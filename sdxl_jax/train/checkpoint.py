"""Checkpoints of a run: the train state and the data iterator together, with Orbax.

    manager = make_manager(workdir / "checkpoints", config)
    restored, step = restore_latest(manager, state, data)  # (None, None) without a checkpoint; onto
    state = state if restored is None else restored          # the state's (new) shardings
    save(manager, step, state, data)       # async: returns once the arrays are copied off the devices
    manager.wait_until_finished()          # at the end, or on preemption

A checkpoint `checkpoints/<step>/` holds `state/` (params, optimiser state, EMA, step, RNG, skip
counters: one `TrainState`, saved by every process for its own shards) and `data/` (grain's handler:
`process_<i>-of-<n>.json` per process). Orbax writes a step into a temporary folder and renames it
into place when every item is complete, so a save interrupted by a kill is never listed as a step;
restore takes the newest complete one. Restoring reads each array with the sharding of the target
state, so a checkpoint saved on one mesh restores onto any other.

Preemption: `PreemptionWatch` turns SIGTERM into a flag the loop polls (agreed across processes), so
the loop saves a final checkpoint and exits cleanly.
"""

import signal

import grain.checkpoint
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdxl_jax import storage


def make_manager(directory, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_checkpoints,
        enable_async_checkpointing=config.async_checkpointing, create=True, cleanup_tmp_directories=True,
    )  # fmt: skip
    return ocp.CheckpointManager(storage.orbax_path(directory, "--workdir's checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data) -> None:
    """Save `state` and the data iterator's position as `step` (the caller decides when).

    The iterator's state is read now, synchronously, so the iterator may move on while the arrays
    are written in the background."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data))
    manager.save(step, args=args, force=True)


def abstract_like(state):
    """`ShapeDtypeStruct`s with the shardings of `state`: where and how to restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(manager: ocp.CheckpointManager, step: int, target, data=None):
    """The state saved at `step`, laid out like `target` (arrays or `abstract_like` structs); with
    `data`, the iterator is moved to where it was (it must be this run's process layout)."""
    args = {"state": ocp.args.StandardRestore(abstract_like(target))}
    if data is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data)
    return manager.restore(step, args=ocp.args.Composite(**args)).state


def restore_latest(manager: ocp.CheckpointManager, target, data):
    """(state, step) from the newest complete checkpoint, or (None, None) when there is none."""
    step = manager.latest_step()
    if step is None:
        return None, None
    return restore(manager, step, target, data), step


class PreemptionWatch:
    """SIGTERM -> a flag; `requested()` is True on every process as soon as any process got one.

    Use as a context manager around the loop (the previous handler comes back after)."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _handler(self, signum, frame):
        self.received = True

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)

    def requested(self) -> bool:
        """Collective when there are several processes: call it at the same step everywhere."""
        if jax.process_count() == 1:
            return self.received
        return bool(np.any(multihost_utils.process_allgather(np.array([self.received]))))
