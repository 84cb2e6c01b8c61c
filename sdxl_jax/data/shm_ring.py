"""Batches from grain worker processes to the trainer through shared memory that is reused, not remade.

    ds = ds.map(to_ring).mp_prefetch(options).map(from_ring)

grain 0.2 hands every array a worker produces to the main process in a freshly created shared-memory
block. For SDXL batches (8 x 1024² x 3 bytes = 24 MB) the first write into fresh pages costs as much as
a fifth of the decode work (~18 ms per batch here, against ~1 ms into pages already mapped), so two
worker processes on two cores gained only 1.40-1.49x over one process. Here each worker keeps a few
blocks ("slots") and writes batch after batch into them:

    worker  `to_ring(batch)`: takes a free slot (makes a new one if none is free), copies every array into it,
            marks it busy, and returns a small `RingBatch` (slot name + layout) that grain pickles.
    main    `from_ring(ring_batch)`: maps the slot (once; then unlinks its name, so nothing outlives
            the two processes), and returns the batch as arrays that *view* the slot, no copy. The
            slot is marked free when the last of those arrays is garbage-collected, and only then
            reused: an array is never overwritten while anything can read it.

A slot's first 64 bytes are its header; byte 0 is 1 while the main process may still read the slot.
A batch the main process never receives (dropped by grain on `set_state` or `close`) keeps its slot
busy; the worker just makes another (so does a consumer that keeps every batch: memory then grows as
it would with grain's own transfer). A worker removes the names of its slots when it exits; slots are
`multiprocessing.shared_memory` blocks, so the resource tracker removes any a killed worker leaves.
"""

import dataclasses
import multiprocessing.util
import os
import weakref
from multiprocessing import shared_memory

import numpy as np

_HEADER = 64  # bytes before the data; byte 0: busy flag
_ALIGN = 64  # each array starts on a 64-byte boundary
_SPARE = 1.125  # a new slot holds 12.5% more than the batch that made it (buckets differ a little in area)


@dataclasses.dataclass(frozen=True)
class RingBatch:
    """A batch in a worker's slot: what crosses the process boundary instead of the arrays."""

    slot: str  # shared-memory name
    arrays: tuple  # ((key, offset, nbytes, shape, dtype str), ...), offsets from the end of the header
    other: dict  # the batch's non-array values, as they were


class _WorkerRing:
    """The slots of one worker process (`SharedMemory` blocks; `buf[0]` is the busy flag)."""

    def __init__(self):
        self.pid = os.getpid()
        self.slots: list[shared_memory.SharedMemory] = []
        # At the worker's exit, remove the names of slots whose batches the main process never took.
        multiprocessing.util.Finalize(self, self.close, exitpriority=0)

    def close(self) -> None:
        while self.slots:
            _close(self.slots.pop())

    def put(self, batch: dict) -> RingBatch:
        arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and not v.dtype.hasobject}
        layout, end = [], 0
        for key, value in arrays.items():
            layout.append((key, end, value.nbytes, value.shape, value.dtype.str))
            end += -(-value.nbytes // _ALIGN) * _ALIGN
        slot = self._free_slot(end)
        for key, offset, _, shape, dtype in layout:  # (no view of the slot outlives this: close() needs none)
            np.copyto(np.ndarray(shape, dtype, buffer=slot.buf, offset=_HEADER + offset), arrays[key], casting="no")
        slot.buf[0] = 1
        return RingBatch(slot.name, tuple(layout), {k: v for k, v in batch.items() if k not in arrays})

    def _free_slot(self, nbytes: int) -> shared_memory.SharedMemory:
        for slot in self.slots:
            if slot.buf[0] == 0 and slot.size - _HEADER >= nbytes:
                return slot
        for slot in [s for s in self.slots if s.buf[0] == 0]:  # free but too small for this bucket: retire
            self.slots.remove(slot)
            _close(slot)
        slot = shared_memory.SharedMemory(create=True, size=_HEADER + -(-int(nbytes * _SPARE) // 65536) * 65536)
        slot.buf[0] = 0
        self.slots.append(slot)
        return slot


def _close(slot: shared_memory.SharedMemory) -> None:
    try:
        slot.unlink()
    except FileNotFoundError:
        pass  # the usual case: the main process unlinked it when it first mapped it
    slot.close()


_worker_ring: _WorkerRing | None = None


def to_ring(batch: dict) -> RingBatch:
    """Worker side: copy `batch`'s arrays into one of this process's slots."""
    global _worker_ring
    if _worker_ring is None or _worker_ring.pid != os.getpid():
        _worker_ring = _WorkerRing()
    return _worker_ring.put(batch)


_attached: dict[str, shared_memory.SharedMemory] = {}


def _attach(name: str) -> shared_memory.SharedMemory:
    if name not in _attached:
        shm = shared_memory.SharedMemory(name)
        # Both processes have it mapped now; the name is no longer needed. unlink() also takes it off
        # the resource tracker, so it does not report the block as leaked.
        shm.unlink()
        _attached[name] = shm
    return _attached[name]


def _release(slot: shared_memory.SharedMemory) -> None:
    slot.buf[0] = 0


def from_ring(ring_batch: RingBatch) -> dict:
    """Main side: the batch as arrays viewing the worker's slot; the slot is freed when they are gone.

    Raises if the slot was not handed over (a worker wrote into a slot the main process still reads).
    """
    slot = _attach(ring_batch.slot)
    if slot.buf[0] != 1:
        raise RuntimeError(f"shared-memory slot {ring_batch.slot} arrived without its busy flag set")
    end = max((off + n for _, off, n, _, _ in ring_batch.arrays), default=0)
    root = np.ndarray((end,), np.uint8, buffer=slot.buf, offset=_HEADER)  # every array below is a view of root
    weakref.finalize(root, _release, slot)
    batch = {key: root[off:off + n].view(dt).reshape(shape) for key, off, n, shape, dt in ring_batch.arrays}
    return batch | ring_batch.other
