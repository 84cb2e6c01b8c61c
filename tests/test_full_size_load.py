"""Full-size SDXL base loading within memory (slow: ~7 GB written, a conversion and four full loads).

A random fp16 checkpoint in the real single-file layout (every tensor of the released base file) and
its conversion to this project's format are loaded by `Pipeline.load` in fresh processes
(`bench/memory.py --job load`), fp32 and bf16, and must hold: peak RSS <= 1.25 x the weights in the
target dtype + 1 GiB, RSS after loading <= the weights + 1 GiB."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from bench.convert import random_tensors
    from sdxl_jax.convert.export import write_safetensors

    work = tmp_path_factory.mktemp("full_size")
    write_safetensors(work / "sdxl_base_random_fp16.safetensors", random_tensors(), {"format": "pt"})
    convert = [sys.executable, "-m", "sdxl_jax.convert", str(work / "sdxl_base_random_fp16.safetensors")]
    subprocess.run(convert + [str(work / "ckpt")], check=True, capture_output=True)
    return work


@pytest.mark.parametrize("source", ["single", "project"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_full_size_load_holds_one_copy_of_the_weights(workdir, source, dtype):
    cmd = [sys.executable, str(ROOT / "bench" / "memory.py"), "--job", "load", "--dtype", dtype,
           "--source", source, "--workdir", str(workdir)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    result = json.loads([line for line in output.splitlines() if line.startswith("RESULT ")][-1][7:])
    weights, peak = result["weights_bytes"], usage.ru_maxrss * 1024
    assert weights > (6 if dtype == "bf16" else 12.5) * GiB  # the whole model was loaded
    assert peak <= 1.25 * weights + GiB, f"peak RSS {peak / GiB:.2f} GiB for {weights / GiB:.2f} GiB of weights"
    assert result["rss_after_load"] <= weights + GiB, result
