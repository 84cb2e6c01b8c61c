"""The shipped demo model learned its task: held-out (shape, colour, background) prompts come out right,
and the micro-conditioning steers it. Runs on the checkpoint in `sdxl_jax/assets/demo`.

The check is pixel statistics (`tests/helpers/shape_reader.py`), validated first on the generator's own
renders (sharp and blurred).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import demo
from sdxl_jax.data import shapes
from tests.helpers.shape_reader import classify, generate, score

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_the_classifier_reads_the_generators_own_images(blur):
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    right = 0
    every = (shapes.SHAPES + shapes.NEW_SHAPES, tuple(shapes.PALETTE))
    triples = (
        shapes.all_triples()
        + shapes.all_triples(shapes.NEW_SHAPES)
        + shapes.all_triples(shapes.SHAPES, tuple(shapes.NEW_COLOURS))
    )
    for shape, fg, bg in triples:
        image = shapes.render(shape, fg, bg, 32, 32, rng)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        vocabulary = every if (shape, fg, bg) not in shapes.all_triples() else (shapes.SHAPES, tuple(shapes.COLOURS))
        right += classify(np.asarray(image), *vocabulary) == (shape, fg, bg)
    assert right >= 0.97 * len(triples), f"{right}/{len(triples)}"


def test_held_out_prompts_are_disjoint_from_training():
    seen = {shapes.example(i, 0)[0] for i in range(4000)}
    assert not seen & set(shapes.HELD_OUT)
    assert len(shapes.HELD_OUT) >= 20
    assert {s for s, _, _ in shapes.HELD_OUT} == set(shapes.SHAPES)


def test_the_shapes_folder_is_written_once_with_varied_sizes(tmp_path):
    root = shapes.write_shapes_folder(tmp_path / "shapes", num_images=30, seed=3, progress=False)
    pngs = sorted(root.glob("*.png"))
    assert len(pngs) == 30 and len(list(root.glob("*.txt"))) == 30
    sizes = {Image.open(p).size for p in pngs}
    assert len({round(w / h, 2) for w, h in sizes}) >= 4 and min(min(s) for s in sizes) >= 24
    caption = (root / "00000.txt").read_text().strip()
    assert caption == shapes.caption(*shapes.example(0, 3)[0])
    stamp = pngs[0].stat().st_mtime_ns
    shapes.write_shapes_folder(root, num_images=30, seed=3, progress=False)  # complete: left alone
    assert pngs[0].stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def pipe():
    from sdxl_jax.pipeline import Pipeline

    return Pipeline.load(demo.SHIPPED, dtype="fp32")


@pytest.fixture(scope="module")
def held_out(pipe):
    """(prompt, wanted (shape, fg, bg), read back (shape, fg, bg)) for every held-out combination."""
    prompts = [shapes.caption(*t) for t in shapes.HELD_OUT]
    images = generate(pipe, prompts, seed=[100 + i for i in range(len(prompts))])
    return [(p, t, classify(image)) for p, t, image in zip(prompts, shapes.HELD_OUT, images)]


def test_held_out_prompts_get_their_colours(held_out):
    right, report = score(held_out, (1, 2))  # foreground and background
    assert right >= 0.8 * len(held_out), f"{right}/{len(held_out)} right:\n{report}"


def test_held_out_prompts_get_their_shapes_far_more_often_than_by_chance(held_out):
    right, report = score(held_out, (0, 1))
    # a random shape is right 1/3 of the time; one shape for every prompt at most 10/23 (triangles)
    most_common = max(sum(want[0] == s for _, want, _ in held_out) for s in shapes.SHAPES)
    assert right >= 0.55 * len(held_out) > most_common, f"{right}/{len(held_out)} right:\n{report}"


def test_held_out_prompts_get_their_shapes_and_colours(held_out):
    right, report = score(held_out, (0, 1))  # the criterion: shape and foreground colour
    assert right >= 0.8 * len(held_out), f"{right}/{len(held_out)} right:\n{report}"


def test_size_and_crop_conditioning_change_the_output(pipe):
    prompts, seeds = ["a yellow square on a blue background"] * 4, [0, 1, 2, 3]
    plain = generate(pipe, prompts, seed=seeds).astype(np.float64)
    np.testing.assert_array_equal(generate(pipe, prompts, seed=seeds), plain)  # deterministic: changes are the model's
    for micro in (dict(original_size=(192, 192)), dict(crop=(8, 8))):
        change = np.abs(generate(pipe, prompts, seed=seeds, **micro) - plain)
        assert change.mean() > 1.5 and change.max() > 30, (micro, change.mean(), change.max())


def test_sample_py_runs_the_shipped_demo(tmp_path):
    cmd = [
        sys.executable,
        "sample.py",
        "--config",
        "configs/demo.py",
        "--prompt",
        "a green triangle on a white background",
        "--outdir",
        str(tmp_path),
        "--config.sample.compilation_cache=none",
    ]
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (png,) = tmp_path.glob("*.png")
    image = np.asarray(Image.open(png))
    assert image.shape == (32, 32, 3)
    assert classify(image)[1:] == ("green", "white")
