"""sample.py end to end on a tiny random checkpoint in this project's format: PNGs with web-UI infotext,
one line per batch, clear errors, and the persistent compilation cache reused by a second run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdxl_jax.convert.pipeline_weights import save_project
from sdxl_jax.convert.random_init import random_weights, tiny_configs

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_project(random_weights("base", tiny_configs("base")), tmp_path_factory.mktemp("ckpt") / "tiny")


def run_sample(*args, cache=None):
    cmd = [sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs/sdxl_base.py"), *args]
    if cache is not None:
        cmd.append(f"--config.compilation_cache={cache}")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.slow  # test budget: a ~40 s sample.py process; test_demo runs sample.py by default
def test_sample_writes_pngs_with_parameters_and_reuses_the_cache(checkpoint, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [
        f"--config.checkpoint={checkpoint}",
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue ball",
        "--n",
        "2",
        "--steps",
        "3",
        "--width",
        "96",
        "--height",
        "64",
        "--batch_size",
        "3",
        "--seed",
        "10",
        "--negative_prompt",
        "blurry",
        "--sampler",
        "euler_a",
        "--config.dtype=fp32",
        "--outdir",
        str(out),
    ]
    first = run_sample(*args, cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    batch_lines = [line for line in first.stdout.splitlines() if line.startswith("batch ")]
    assert len(batch_lines) == 2 and all("images/s" in line for line in batch_lines)  # 4 images in batches of 3
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"{s:08d}.png" for s in (10, 11, 12, 13)]
    image = Image.open(files[2])
    assert image.size == (96, 64) and image.mode == "RGB"
    assert image.text["parameters"].splitlines() == [
        "a blue ball",
        "Negative prompt: blurry",
        "Steps: 3, Sampler: Euler a, CFG scale: 5.0, Seed: 12, Size: 96x64, Model: tiny, Version: sdxl_jax 0.1.0",
    ]
    entries = sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_generate"))
    assert len(entries) == 1  # the program was written to the persistent cache

    second = run_sample(*args, cache=cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_generate")) == entries  # a cache hit
    # Same seeds, same images: image k depends on seed + k only.
    assert Image.open(files[2]).tobytes() == image.tobytes()


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x"], "no checkpoint"),
    (["--prompt", "x", "--config.checkpoint=/nonexistent/ckpt"], "no such file or folder"),
    (["--config.checkpoint=CKPT"], "no prompts"),
    (["--prompt", "x", "--config.checkpoint=CKPT", "--sampler", "euler_b"], "valid: euler, euler_a"),
])  # fmt: skip
def test_sample_errors_are_clear(checkpoint, args, message):
    result = run_sample(*[a.replace("CKPT", str(checkpoint)) for a in args], cache="none")
    assert result.returncode != 0
    assert message in result.stderr
