"""The global batch schedule: one bucket per batch, deterministic in (seed, epoch), epochs, remainders."""

import collections

import numpy as np
import pytest

from sdxl_jax.data.batch_plan import BatchPlan


def make_plan(counts, g, seed=0, remainder="drop", epochs=None):
    bucket_of = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(123)
    perm = rng.permutation(len(bucket_of))  # records of a bucket are scattered through the source
    record_ids = np.arange(len(bucket_of)) * 10 + 7
    return BatchPlan(bucket_of[perm], record_ids[perm], len(counts), g, seed, remainder, epochs), dict(
        zip(record_ids[perm].tolist(), bucket_of[perm].tolist())
    )


def epoch_batches(plan, epoch):
    start = plan.steps_before(epoch)
    return [plan.global_batch(start + k) for k in range(plan.steps_in_epoch(epoch))]


def test_drop_each_epoch_is_a_fresh_partition_of_each_bucket():
    plan, bucket_of = make_plan([10, 7, 3, 0, 25], g=4)
    assert plan.steps_in_epoch(0) == 2 + 1 + 0 + 0 + 6
    for epoch in range(3):
        batches = epoch_batches(plan, epoch)
        used = collections.Counter()
        for bucket, ids in batches:
            assert {bucket_of[int(r)] for r in ids} == {bucket}  # one bucket per batch
            used.update(ids.tolist())
        assert max(used.values()) == 1  # no record twice in an epoch
        per_bucket = collections.Counter(bucket_of[r] for r in used)
        assert per_bucket == {0: 8, 1: 4, 4: 24}
    assert [b for b, _ in epoch_batches(plan, 0)] != [b for b, _ in epoch_batches(plan, 1)]  # reshuffled


def test_same_seed_same_plan_other_seed_other_plan():
    a, _ = make_plan([10, 7, 25], g=4, seed=3)
    b, _ = make_plan([10, 7, 25], g=4, seed=3)
    c, _ = make_plan([10, 7, 25], g=4, seed=4)
    steps = range(30)
    ga = [(k, ids.tolist()) for k, ids in map(a.global_batch, steps)]
    assert ga == [(k, ids.tolist()) for k, ids in map(b.global_batch, steps)]
    assert ga != [(k, ids.tolist()) for k, ids in map(c.global_batch, steps)]


def test_carry_uses_every_record_and_spills_remainders_into_the_next_epoch():
    counts, g = [10, 7, 3], 4
    plan, bucket_of = make_plan(counts, g, remainder="carry", epochs=4)
    assert plan.num_steps == sum(4 * n // g for n in counts) == 10 + 7 + 3
    assert [plan.steps_in_epoch(e) for e in range(4)] == [
        sum((e + 1) * n // g - e * n // g for n in counts) for e in range(4)
    ]
    seen = collections.Counter()
    for step in range(plan.num_steps):
        bucket, ids = plan.global_batch(step)
        assert {bucket_of[int(r)] for r in ids} == {bucket}
        seen.update(ids.tolist())
    # over 4 epochs every record of a bucket is used 4 times, except the final partial batch's worth
    for b, n in enumerate(counts):
        uses = [seen[r] for r, bb in bucket_of.items() if bb == b]
        assert sum(uses) == 4 * n // g * g and max(uses) - min(uses) <= 1
    # the 3-record bucket never fills a batch in epoch 0 but does later
    assert 2 not in {b for b, _ in epoch_batches(plan, 0)} and 2 in {
        b for e in (1, 2, 3) for b, _ in epoch_batches(plan, e)
    }


def test_buckets_are_visited_in_proportion_to_their_size():
    plan, _ = make_plan([400, 100, 200, 300], g=10, seed=1)
    visits = collections.Counter(plan.global_batch(s)[0] for s in range(plan.steps_in_epoch(0)))
    assert visits == {0: 40, 1: 10, 2: 20, 3: 30}
    first_half = collections.Counter(plan.global_batch(s)[0] for s in range(50))
    assert len(first_half) == 4  # interleaved, not bucket after bucket


def test_epoch_of_and_limits():
    plan, _ = make_plan([10, 7], g=4, epochs=3)
    assert plan.num_steps == 9
    assert [plan.epoch_of(s) for s in range(9)] == [(e, k) for e in range(3) for k in range(3)]
    with pytest.raises(IndexError):
        plan.epoch_of(9)
    endless, _ = make_plan([10, 7], g=4)
    assert endless.num_steps is None and endless.epoch_of(3000) == (1000, 0)


def test_errors_are_loud():
    with pytest.raises(ValueError, match="no bucket has 8"):
        make_plan([5, 7], g=8)
    with pytest.raises(ValueError, match="remainder"):
        make_plan([5, 7], g=2, remainder="pad")


def test_substitutes_come_from_the_same_bucket_deterministically():
    plan, bucket_of = make_plan([10, 7], g=4)
    subs = [plan.substitute(1, 5, 2, a) for a in range(6)]
    assert all(bucket_of[s] == 1 for s in subs)
    assert subs == [plan.substitute(1, 5, 2, a) for a in range(6)] and len(set(subs)) > 1
