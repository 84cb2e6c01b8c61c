"""The shared-memory ring between grain workers and the trainer: exact round trip, and a slot is reused
only once nothing can read it. (Across real worker processes: test_data_loader's worker test.)"""

import gc
import multiprocessing

import numpy as np

from sdxl_jax.data import shm_ring
from sdxl_jax.data.shm_ring import from_ring, to_ring


def batch(seed: int, h: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return dict(
        images=rng.integers(0, 256, (2, h, 24, 3), dtype=np.uint8),
        ids=rng.integers(0, 49408, (2, 77), dtype=np.int32),
        drop=rng.random(2) < 0.5,
        score=rng.random(2).astype(np.float32),
        empty=np.zeros((0, 3), np.float32),
        note="kept as is",
    )


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        else:
            assert got[k] == v


def test_round_trip_is_exact_and_passes_other_values_through():
    ring = to_ring(batch(0))
    assert all(not isinstance(v, np.ndarray) for v in vars(ring).values())  # only the layout crosses processes
    assert_same(from_ring(ring), batch(0))


def test_a_slot_is_reused_only_after_every_view_of_its_batch_is_gone():
    first_ring = to_ring(batch(1))
    kept = from_ring(first_ring)["images"][1]  # a view keeps the whole batch's slot busy
    gc.collect()
    second_ring = to_ring(batch(2))
    assert second_ring.slot != first_ring.slot
    assert_same(from_ring(second_ring), batch(2))
    np.testing.assert_array_equal(kept, batch(1)["images"][1])  # not overwritten
    del kept
    gc.collect()
    slots = len(shm_ring._worker_ring.slots)
    for seed in range(3, 8):  # taken and dropped one at a time: the free slots are reused, none added
        assert_same(from_ring(to_ring(batch(seed))), batch(seed))
        gc.collect()
    assert len(shm_ring._worker_ring.slots) == slots


def test_a_batch_larger_than_the_free_slots_gets_a_new_one():
    small = from_ring(to_ring(batch(4, h=8)))
    del small
    gc.collect()
    before = {s.name for s in shm_ring._worker_ring.slots}
    big = to_ring(batch(5, h=2048))
    assert big.slot not in before
    after = shm_ring._worker_ring.slots
    assert len(after) <= len(before)  # the free slots that were too small are retired, not kept
    assert all(s.buf[0] == 1 or s.size >= 2 * 2048 * 24 * 3 for s in after)
    retired = before - {s.name for s in after}
    assert retired and set(big.retired) == retired
    assert_same(from_ring(big), batch(5, h=2048))
    assert not retired & shm_ring._attached.keys()  # the main side let go of its mappings too


def _worker(conn, seed):
    conn.send(to_ring(batch(seed)))
    conn.recv()  # exit (removing its slot names) only once the main side has mapped the slot


def _from_a_worker_process(seed: int) -> tuple[dict, str]:
    """A batch made by a separate process, which has exited when this returns (its slot still mapped here)."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    worker = ctx.Process(target=_worker, args=(there, seed))
    worker.start()
    ring = here.recv()
    got = from_ring(ring)
    here.send("done")
    worker.join(timeout=60)
    assert worker.exitcode == 0
    return got, ring.slot


def test_slots_of_exited_workers_are_unmapped_once_their_batches_are_gone():
    first, first_slot = _from_a_worker_process(10)
    assert_same(first, batch(10))  # readable after the worker has exited
    second, second_slot = _from_a_worker_process(11)  # mapping a new slot sweeps: the first is still in use
    assert {first_slot, second_slot} <= shm_ring._attached.keys()
    assert_same(first, batch(10))
    del first, second
    gc.collect()
    _, third_slot = _from_a_worker_process(12)
    assert first_slot not in shm_ring._attached and second_slot not in shm_ring._attached
    assert third_slot in shm_ring._attached
