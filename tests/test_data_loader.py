"""The grain loader: the batch contract, determinism, per-host slices, checkpointed iterator state, workers."""

import numpy as np
import pytest

from sdxl_jax.data import build_pipeline, default_data_config, make_loader
from sdxl_jax.tokenizer import tokenize_pair
from tests.helpers.data_fixtures import SMALL_BUCKETS, mixed_folder, tfds_dataset, webdataset_shards

KEYS = {"images", "ids_l", "ids_g", "eot_l", "eot_g", "original_size", "crop_top_left", "target_size", "drop_text",
        "aesthetic_score", "record_id"}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return mixed_folder(tmp_path_factory.mktemp("mixed"), n=16)


def config(path, **overrides):
    c = default_data_config()
    c.update(dict(path=str(path), buckets=SMALL_BUCKETS, num_workers=0, record_ids=True, caption_dropout=0.2,
                  flip_prob=0.5, num_epochs=2, remainder="carry") | overrides)  # fmt: skip
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract(folder):
    pipe = build_pipeline(config(folder), seed=0, global_batch_size=4, process_index=0, process_count=1)
    assert pipe.plan.num_steps == 8  # 16 records in 4 buckets of 4, carried: 2 epochs x 4 batches
    for batch in pipe.dataset:
        assert set(batch) == KEYS
        b, h, w, c = batch["images"].shape
        assert (b, c) == (4, 3) and batch["images"].dtype == np.uint8
        for k in ("ids_l", "ids_g"):
            assert batch[k].shape == (4, 77) and batch[k].dtype == np.int32
        for k in ("eot_l", "eot_g"):
            assert batch[k].shape == (4,) and batch[k].dtype == np.int32
        for k in ("original_size", "crop_top_left", "target_size"):
            assert batch[k].shape == (4, 2) and batch[k].dtype == np.int32
        assert batch["drop_text"].dtype == bool and batch["aesthetic_score"].dtype == np.float32
        assert (batch["target_size"] == [h, w]).all()  # one bucket per batch
        assert (batch["aesthetic_score"] == 6.0).all()
        for i in range(4):
            text = "" if batch["drop_text"][i] else None
            ids = batch["ids_g"][i]
            if text == "":
                np.testing.assert_array_equal(ids, tokenize_pair([""]).ids_g[0])
            else:
                assert ids[0] == 49406 and 49407 in ids and ids[batch["eot_g"][i]] == 49407
            oh, ow = batch["original_size"][i]
            top, left = batch["crop_top_left"][i]
            scale = max(h / oh, w / ow)
            assert 0 <= top <= max(h, round(oh * scale)) - h and 0 <= left <= max(w, round(ow * scale)) - w


def test_same_seed_same_batches_other_seed_other_batches(folder):
    run = lambda seed: list(
        make_loader(config(folder), seed=seed, global_batch_size=4, process_index=0, process_count=1)
    )
    a, b, c = run(1), run(1), run(2)
    assert_batches_equal(a, b)
    assert [x["record_id"].tolist() for x in a] != [x["record_id"].tolist() for x in c]


def test_hosts_take_slices_of_the_same_global_batch(folder):
    whole = list(make_loader(config(folder), seed=3, global_batch_size=4, process_index=0, process_count=1))
    parts = [
        list(make_loader(config(folder), seed=3, global_batch_size=4, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for step, full in enumerate(whole):
        halves = [parts[0][step], parts[1][step]]
        assert halves[0]["images"].shape == halves[1]["images"].shape  # hosts agree on the bucket
        for k in full:
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k], err_msg=k)
    with pytest.raises(ValueError, match="does not split"):
        build_pipeline(config(folder), seed=0, global_batch_size=5, process_index=0, process_count=2)


def test_restored_state_yields_exactly_the_remaining_batches(folder):
    c = config(folder, num_epochs=None)
    it = make_loader(c, seed=0, global_batch_size=4, process_index=0, process_count=1)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 6)  # crosses into the next epochs
    fresh = make_loader(c, seed=0, global_batch_size=4, process_index=0, process_count=1)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 6), expected)


def test_orbax_checkpoint_of_the_iterator(folder, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    c = config(folder, num_epochs=None)
    it = make_loader(c, seed=0, global_batch_size=4, process_index=0, process_count=1)
    take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = make_loader(c, seed=0, global_batch_size=4, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(take(fresh, 3), expected)


def test_worker_processes_give_the_same_batches_and_restore(folder):
    c0, c2 = config(folder, num_epochs=None), config(folder, num_epochs=None, num_workers=2)
    reference = take(make_loader(c0, seed=5, global_batch_size=4, process_index=0, process_count=1), 7)
    it = make_loader(c2, seed=5, global_batch_size=4, process_index=0, process_count=1)
    try:
        first = take(it, 4)
        state = it.get_state()
        rest = take(it, 3)
    finally:
        it.close()
    assert_batches_equal(first + rest, reference)
    fresh = make_loader(c2, seed=5, global_batch_size=4, process_index=0, process_count=1)
    try:
        fresh.set_state(state)
        assert_batches_equal(take(fresh, 3), reference[4:])
    finally:
        fresh.close()


def test_tar_and_tfds_sources_load(tmp_path):
    shards = webdataset_shards(tmp_path / "tars", n_shards=2, per_shard=4)
    batches = list(make_loader(config(shards, source="tar", caption_dropout=0.0, num_epochs=1), seed=0,
                               global_batch_size=2, process_index=0, process_count=1))  # fmt: skip
    assert sum(len(b["record_id"]) for b in batches) == 8
    assert sorted(np.concatenate([b["aesthetic_score"] for b in batches]).tolist()) == [5, 5, 6, 6, 7, 7, 8, 8]
    tfds_dir = tfds_dataset(tmp_path / "tfds", n=6)
    c = config("", source="tfds", tfds_name=str(tfds_dir), caption_dropout=0.0, num_epochs=1)
    batches = list(make_loader(c, seed=0, global_batch_size=2, process_index=0, process_count=1))
    assert sum(len(b["record_id"]) for b in batches) == 6 and not any(b["drop_text"].any() for b in batches)


def test_missing_or_empty_source_fails_loudly(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_pipeline(config(tmp_path / "nope"), seed=0, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no usable records"):
        build_pipeline(config(tmp_path), seed=0, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="data.source"):
        build_pipeline(config(tmp_path, source="s3"), seed=0, global_batch_size=2, process_index=0, process_count=1)
