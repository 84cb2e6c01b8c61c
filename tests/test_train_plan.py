"""The planner: ahead-of-time compiles of the train step and the sampling program, no weights, no data,
on fake CPU devices and for TPU topologies through libtpu (no TPU here)."""

import re
import subprocess
import sys

import pytest

from tests.helpers.processes import child_env
from tests.helpers.train import REPO

GiB = 2**30


def run_plan(*args: str) -> dict[str, float]:
    env = child_env()  # the planner sets its own device count
    if any(a.startswith("tpu:") for a in args):
        env["XLA_FLAGS"] = ""  # the TPU compiler at its defaults: the tests' fast-compile flags change its plan
    else:
        env["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    result = subprocess.run(
        [sys.executable, "-m", "sdxl_jax.plan", *args], cwd=REPO, capture_output=True, text=True, timeout=1500, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    print(result.stdout)
    figures = {
        k: float(v) * 2**20 for k, v in re.findall(r"^\s+(\w+)\s+[\d.]+ GiB\s+\(([\d.]+) MiB\)", result.stdout, re.M)
    }
    number, unit = re.search(r"FLOPs per (?:step|call): ([\d.]+) (TFLOP|GFLOP)", result.stdout).groups()
    figures["tflop"] = float(number) / (1 if unit == "TFLOP" else 1000)
    figures["devices"] = int(re.search(r"\((\d+) devices\)", result.stdout).group(1))
    if fit := re.search(r"HBM per device ([\d.]+) GiB: (fits|does NOT fit)", result.stdout):
        figures["hbm"], figures["fits"] = float(fit.group(1)) * GiB, fit.group(2) == "fits"
        figures["traffic"] = float(re.search(r"HBM traffic per device: ([\d.]+) GB", result.stdout).group(1)) * 1e9
        figures["bound_ms"] = float(re.search(r"roofline lower bound: ([\d.]+) ms", result.stdout).group(1))
    if best := re.search(r"largest batch per device that fits: (\d+)", result.stdout):
        figures["largest_batch"] = int(best.group(1))
    if rate := re.search(r"roofline images/s per device: ([\d.]+)", result.stdout):
        figures["images_per_s"] = float(rate.group(1))
    return figures


@pytest.mark.slow
def test_tiny_plan_shards_the_state():
    common = ["--config", "configs/tiny.py", "--batch_per_device", "2", "--height", "32", "--width", "32"]
    one = run_plan(*common, "--mesh", "data=1,fsdp=1,tensor=1")
    four = run_plan(*common, "--mesh", "data=1,fsdp=4,tensor=1")
    assert four["devices"] == 4 and one["devices"] == 1
    assert four["arguments"] < 0.4 * one["arguments"]  # params, Adam moments, EMA and frozen weights split over fsdp
    assert four["aliased"] > 0  # the donated state is updated in place
    for f in (one, four):
        assert abs(f["total"] - (f["arguments"] + f["outputs"] - f["aliased"] + f["temporaries"])) < 0.02 * GiB


@pytest.mark.slow
def test_full_sdxl_finetune_plan_on_8_devices():
    """Full SDXL base at 1024², fsdp=8, the config's defaults (remat full, activation constraints on):
    14.5 GiB per device, inside a TPU v5e's 16 GiB (28.9 GiB without the constraints; README planner table)."""
    f = run_plan(
        "--config", "configs/sdxl_finetune_1024.py", "--mesh", "data=1,fsdp=8,tensor=1", "--batch_per_device", "1"
    )
    assert f["total"] < 16 * GiB
    # state: fp32 UNet params + Adam mu, nu + EMA (4 x 10.3 GB) and the frozen encoders/VAE, over 8 devices
    assert 4.5 * GiB < f["arguments"] < 5.8 * GiB
    assert f["aliased"] > 4.5 * GiB  # state donated
    # model FLOPs, 8 examples: UNet fwd + bwd 20.3 TFLOP each, VAE encoder 4.9, text encoders 0.1
    assert 195 < f["tflop"] < 210


TINY_TPU = ["--config", "configs/tiny.py", "--target", "tpu:v5e:2x2", "--height", "32", "--width", "32"]


@pytest.mark.slow
def test_tiny_train_step_compiles_for_a_tpu_topology():
    """The acceptance command (v5e:2x2, fsdp=4) at a tiny bucket: ~50 s per compile, so slow."""
    f = run_plan(*TINY_TPU, "--mesh", "data=1,fsdp=4,tensor=1", "--batch_limit", "8")
    assert f["devices"] == 4 and f["hbm"] == 16 * GiB and f["fits"]
    assert f["largest_batch"] == 8  # a tiny model fits any batch up to the search limit
    assert f["traffic"] > f["arguments"]  # the step reads at least its state and batch
    assert f["bound_ms"] > 0


@pytest.mark.slow
def test_tiny_sampling_program_compiles_for_a_tpu_topology():
    f = run_plan(*TINY_TPU, "--program", "sample", "--steps", "4", "--nosearch_batch")
    assert f["devices"] == 4 and f["fits"] and f["images_per_s"] > 0
    assert f["aliased"] == 0 and f["outputs"] < f["arguments"]  # params are kept; the outputs are a few images


@pytest.mark.slow
def test_full_sdxl_finetune_fits_a_v5e_8():
    """The 1024² fine-tune at its config's defaults on a v5e-8 (fsdp=8), by the TPU compiler's own
    accounting: inside 16 GiB per chip. Compiles for ~20 minutes with ~10 GB of host memory."""
    f = run_plan(
        "--config", "configs/sdxl_finetune_1024.py", "--target", "tpu:v5e:2x4", "--mesh", "data=1,fsdp=8,tensor=1",
        "--nosearch_batch",
    )  # fmt: skip
    assert f["fits"] and f["total"] < 16 * GiB
    assert 4.5 * GiB < f["arguments"] < 5.8 * GiB and f["aliased"] > 4.5 * GiB  # the sharded state, donated
