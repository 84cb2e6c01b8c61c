"""The synthetic source keeps the loader's batch contract, slices per process and resumes exactly;
the TensorBoard writer writes valid records."""

import ml_collections
import numpy as np
import pytest

from sdxl_jax.data.synthetic import make_synthetic
from sdxl_jax.train.tensorboard import EventWriter, crc32c, read_events

CFG = ml_collections.ConfigDict(
    dict(
        num_examples=10,
        buckets=((32, 32), (48, 32)),
        caption_dropout=0.25,
        cached_latents=False,
        context_dim=48,
        pooled_dim=16,
    )
)


def test_batch_contract_and_buckets():
    it = make_synthetic(CFG, seed=1, global_batch_size=4, process_index=0, process_count=1)
    first, second = next(it), next(it)
    want = {"images": ((4, 32, 32, 3), np.uint8), "ids_l": ((4, 77), np.int32), "ids_g": ((4, 77), np.int32),
            "eot_l": ((4,), np.int32), "eot_g": ((4,), np.int32), "original_size": ((4, 2), np.int32),
            "crop_top_left": ((4, 2), np.int32), "target_size": ((4, 2), np.int32), "drop_text": ((4,), np.bool_),
            "aesthetic_score": ((4,), np.float32)}  # fmt: skip
    assert {k: (v.shape, v.dtype) for k, v in first.items()} == want
    assert second["images"].shape == (4, 48, 32, 3) and (second["target_size"] == [48, 32]).all()
    assert (first["ids_l"][:, 0] == 49406).all() and (first["ids_l"][np.arange(4), first["eot_l"]] == 49407).all()
    assert (first["ids_g"][np.arange(4), first["eot_g"]] == 49407).all()
    assert len({tuple(img.reshape(-1, 3)[0]) for img in first["images"]}) > 1  # not all the same picture
    cfg = ml_collections.ConfigDict(CFG.to_dict() | {"cached_latents": True})
    batch = next(make_synthetic(cfg, seed=1, global_batch_size=4, process_index=0, process_count=1))
    assert "images" not in batch
    assert batch["latent_moments"].shape == (4, 4, 4, 8) and batch["latent_moments"].dtype == np.float32
    assert batch["context"].shape == (4, 77, 48) and batch["pooled"].shape == (4, 16)


def test_processes_read_disjoint_slices_of_the_global_batch():
    whole = make_synthetic(CFG, seed=2, global_batch_size=4, process_index=0, process_count=1)
    parts = [make_synthetic(CFG, seed=2, global_batch_size=4, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):  # crosses an epoch boundary (10 examples)
        full, halves = next(whole), [next(p) for p in parts]
        for key in full:
            np.testing.assert_array_equal(full[key], np.concatenate([h[key] for h in halves]))
    with pytest.raises(ValueError, match="does not split"):
        make_synthetic(CFG, seed=2, global_batch_size=5, process_index=0, process_count=2)


def test_state_round_trip_resumes_exactly_and_epochs_reshuffle():
    it = make_synthetic(CFG, seed=3, global_batch_size=4, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = make_synthetic(CFG, seed=3, global_batch_size=4, process_index=0, process_count=1)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = make_synthetic(CFG, seed=4, global_batch_size=4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed 3"):
        other.set_state(state)
    order = np.concatenate([it._examples(k) for k in range(5)])  # noqa: SLF001  (20 rows: two epochs)
    assert sorted(order[:10].tolist()) == sorted(order[10:].tolist()) == list(range(10))
    assert not np.array_equal(order[:10], order[10:])  # each epoch its own permutation


def test_tensorboard_records_round_trip(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    writer = EventWriter(tmp_path)
    writer.scalars(7, {"train/loss": 0.25, "train/lr": 1e-4})
    writer.image(8, "validation/0", np.full((4, 6, 3), 200, np.uint8))
    writer.close()
    events = read_events(writer.path)
    assert [e["step"] for e in events] == [0, 7, 8]
    assert events[1]["scalars"] == {"train/loss": 0.25, "train/lr": np.float32(1e-4)}
    h, w, data = events[2]["images"]["validation/0"]
    assert (h, w) == (4, 6) and data.startswith(b"\x89PNG")
