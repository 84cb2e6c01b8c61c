"""The planner's targets, roofline and batch search, without compiling anything."""

import math

import jax
import pytest

from sdxl_jax.train.memory_plan import planned_size
from sdxl_jax.train.plan_report import Compiled, largest_batch, measure, report
from sdxl_jax.train.targets import CHIPS, GiB, Target, parse_target, roofline


def test_target_grammar():
    assert parse_target("tpu:v5e:2x4") == Target("tpu", "v5e:2x4")
    assert parse_target("tpu:v5p:2x2x1").chips == 4
    assert parse_target("tpu:v6e:16x16").chips == 256
    assert parse_target("cpu") == Target("cpu") and parse_target("cpu:8").cpu_devices == 8
    assert str(parse_target("tpu:v5e:2x4")) == "tpu:v5e:2x4" and str(parse_target("cpu:8")) == "cpu:8"
    assert parse_target("tpu:v5e:2x2").chip == CHIPS["v5e"] and parse_target("cpu").chip is None
    assert parse_target("gpu:h100:8") == Target("gpu", "h100:8") and str(parse_target("gpu:h100:8")) == "gpu:h100:8"
    assert parse_target("gpu:h100:8").chips == 8 and parse_target("gpu:h100:1").chip == CHIPS["h100"]
    bad = ("tpu:v7:2x2", "tpu:v5e", "tpu:v5e:2xa", "tpu:h100:8", "gpu:8", "gpu:v5e:8", "gpu:h100:2x4", "gpu:h100:0")
    for text in (*bad, "cpu:x", "v5e:2x4"):
        with pytest.raises(ValueError, match="(tpu|gpu):"):
            parse_target(text)


def test_per_device_shares_a_chip():
    one = parse_target("tpu:v4:2x2x1")  # 4 chips; libtpu lists 8 devices (2 TensorCores per chip)
    assert one.per_device(4) == (32 * GiB, 275e12, 1200e9)
    assert one.per_device(8) == (16 * GiB, 137.5e12, 600e9)


def test_roofline_is_the_slower_resource():
    compute_bound = roofline(flops=197e12, traffic=819e9 / 2, peak_flops=197e12, bandwidth=819e9)
    assert compute_bound == {"compute_s": 1.0, "memory_s": 0.5, "bound_s": 1.0, "mfu_ceiling": 1.0}
    memory_bound = roofline(flops=197e12, traffic=4 * 819e9, peak_flops=197e12, bandwidth=819e9)
    assert memory_bound["bound_s"] == 4.0 and memory_bound["mfu_ceiling"] == 0.25


def _compiled(total: float) -> Compiled:
    return Compiled(1, total, 0, 0, 0, 0.0, 0.0, 0.0)  # all the bytes as arguments


@pytest.mark.parametrize(
    "memory, first, most",
    [
        (lambda b: 3 + 2 * b, 1, 3),  # affine: predicted from a second compile, confirmed on both sides
        (lambda b: 3 + 2 * b + 0.3 * b * b, 1, 3),  # convex: the prediction is off
        (lambda b: 3 + 2 * b + 0.3 * b * b, 8, 4),  # starting from a batch that does not fit
        (lambda b: 10 + 0.01 * b, 1, 2),  # still fits at the limit
        (lambda b: 20 + b, 1, 1),  # nothing fits
        (lambda b: 1 + b if b < 5 else 100, 1, 6),  # a cliff (a layout change) below the prediction: bisection
        (lambda b: 8 + b / 8 if b < 20 else 8 + b / 4, 2, 8),  # a kink below the prediction: bisection
        (lambda b: 6 + 2 * b if b < 4 else math.inf, 1, 4),  # the compiler refuses (no size in its message)
        (lambda b: math.inf, 2, 2),  # refused from the start
    ],
)
def test_largest_batch_search(memory, first, most):
    hbm, limit = 16, 64
    want = max((b for b in range(1, limit + 1) if memory(b) <= hbm), default=0)
    compiled = []

    def compile_at(b):
        compiled.append(b)
        return _compiled(memory(b))

    best, tried = largest_batch(compile_at, first, _compiled(memory(first)), hbm, limit)
    assert best == want
    assert dict(tried) == {b: memory(b) for b in [first, *compiled]}
    assert len(compiled) == len(set(compiled)) <= most  # each batch compiled once, few compiles in all
    if 0 < best < limit:
        assert memory(best) <= hbm < memory(best + 1) and best + 1 in compiled  # both sides were compiled


def test_planned_size_defaults_to_the_config():
    from configs import tiny  # the training config: buckets 32x32 and 32x48 (h, w), validation 32x32

    config = tiny.get_config()
    assert planned_size(config, "train", None, None) == (32, 48)  # the largest bucket: the most memory
    assert planned_size(config, "sample", None, None) == (32, 32)  # the validation size
    assert planned_size(config, "train", 64, 128) == (64, 128)
    with pytest.raises(Exception, match="together"):
        planned_size(config, "train", 64, None)


def test_a_program_the_compiler_refuses_is_reported_as_not_fitting():
    """The TPU compiler stops at its out-of-memory check with an error instead of a plan; the planner
    reports that (with the temporaries the message names) instead of crashing, and searches on."""
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(21.30G) exceeds available HBM (15.75G).\nmore detail")  # fmt: skip

    class Lowered:
        def compile(self):
            raise jax.errors.JaxRuntimeError(message)

    c = measure(Lowered(), flops=8e12, devices=8, global_batch=32, start=0.0)
    assert c.refused.startswith("RESOURCE_EXHAUSTED") and "\n" not in c.refused
    assert c.total == c.temporaries == round(21.30 * GiB)
    text = report(parse_target("tpu:v5e:2x4"), "train step", c, 8)
    assert "does NOT fit; the compiler refused the program (its temporaries alone 21.30 GiB)" in text
    assert "roofline" not in text and "FLOPs per step: 8.0 TFLOP" in text

    class Broken:
        def compile(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        measure(Broken(), 0.0, 1, 1, 0.0)
