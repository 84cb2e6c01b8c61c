"""Batches from grain worker processes to the trainer through shared memory that is reused, not remade.

    ds = ds.map(to_ring).mp_prefetch(options).map(from_ring)

grain 0.2 hands every array a worker produces to the main process in a freshly created shared-memory
block, and the first write into fresh pages is a large part of a batch's cost for SDXL-sized images
(measured: README, "Performance"). Here each worker keeps a few
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
The main process lets go of its mapping of a slot the worker has retired (the worker names it in its
next batch) and, whenever it maps a new slot, of the free slots of workers that have exited (an
earlier iterator's), so re-creating iterators does not accumulate memory.
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
    pid: int  # the worker's process id
    retired: tuple = ()  # names of slots the worker has closed since its previous batch


class _WorkerRing:
    """The slots of one worker process (`SharedMemory` blocks; `buf[0]` is the busy flag)."""

    def __init__(self):
        self.pid = os.getpid()
        self.slots: list[shared_memory.SharedMemory] = []
        self.retired: list[str] = []
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
        other = {k: v for k, v in batch.items() if k not in arrays}
        ring_batch = RingBatch(slot.name, tuple(layout), other, self.pid, tuple(self.retired))
        self.retired.clear()
        return ring_batch

    def _free_slot(self, nbytes: int) -> shared_memory.SharedMemory:
        for slot in self.slots:
            if slot.buf[0] == 0 and slot.size - _HEADER >= nbytes:
                return slot
        for slot in [s for s in self.slots if s.buf[0] == 0]:  # free but too small for this bucket: retire
            self.slots.remove(slot)
            self.retired.append(slot.name)
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


_attached: dict[str, tuple[shared_memory.SharedMemory, int]] = {}  # name -> (mapping, worker pid)


def _attach(name: str, pid: int) -> shared_memory.SharedMemory:
    if name not in _attached:
        _forget_exited_workers()
        shm = shared_memory.SharedMemory(name)
        # Both processes have it mapped now; the name is no longer needed. unlink() also takes it off
        # the resource tracker, so it does not report the block as leaked.
        shm.unlink()
        _attached[name] = (shm, pid)
    return _attached[name][0]


def _forget(name: str) -> None:
    """Unmap a slot no array views any more (busy flag 0: the last view of its batch is gone)."""
    shm, _ = _attached.pop(name)
    shm.close()


def _forget_exited_workers() -> None:
    for name, (shm, pid) in list(_attached.items()):
        if shm.buf[0] == 0 and not _alive(pid):
            _forget(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _release(slot: shared_memory.SharedMemory) -> None:
    slot.buf[0] = 0


def from_ring(ring_batch: RingBatch) -> dict:
    """Main side: the batch as arrays viewing the worker's slot; the slot is freed when they are gone.

    Raises if the slot was not handed over (a worker wrote into a slot the main process still reads).
    """
    for name in ring_batch.retired:
        if name in _attached:
            _forget(name)
    slot = _attach(ring_batch.slot, ring_batch.pid)
    if slot.buf[0] != 1:
        raise RuntimeError(f"shared-memory slot {ring_batch.slot} arrived without its busy flag set")
    end = max((off + n for _, off, n, _, _ in ring_batch.arrays), default=0)
    root = np.ndarray((end,), np.uint8, buffer=slot.buf, offset=_HEADER)  # every array below is a view of root
    weakref.finalize(root, _release, slot)
    batch = {key: root[off : off + n].view(dt).reshape(shape) for key, off, n, shape, dt in ring_batch.arrays}
    return batch | ring_batch.other
