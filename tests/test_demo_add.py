"""The demo, distilled (`configs/demo_add.py`): ADD turns the shipped demo model into a 1-4 step student.

Trains the student as the README's command does (in this process), with and without the adversarial
term, then reads the images back with `tests/helpers/shape_reader.py` on the demo test's held-out prompts
and seeds: the teacher at its own 40 steps, the students at 1, 2 and 4 steps of the turbo sampler
(Euler ancestral, trailing, no CFG), the teacher at those steps too. Writes the README's grid image
(teacher at 40 steps | student at 1, 2, 4 steps | distillation alone at 4 steps) into its tmp dir and
prints the figures for the README. Run it with SDXL_JAX_TEST_FULL_OPT=1: under the suite's fast-compile
XLA flags (tests/conftest.py) a training step runs ~3x slower (2.3 s instead of 0.8).
"""

import time

import numpy as np
import pytest
from PIL import Image

from configs import demo, demo_add
from sdxl_jax.data import shapes
from tests.helpers.shape_reader import classify, generate, score

SEEDS = (100, 200, 300, 400, 500)  # per prompt, as the LoRA demo test reads them
PROMPTS = [shapes.caption(*t) for t in shapes.HELD_OUT for _ in SEEDS]
PER_PROMPT_SEEDS = [seed + i for i in range(len(shapes.HELD_OUT)) for seed in SEEDS]
WANTED = [t for t in shapes.HELD_OUT for _ in SEEDS]


def turbo(pipe, steps: int) -> np.ndarray:
    """uint8 `[N, 32, 32, 3]`: the held-out prompts in `steps` steps of the turbo sampler, no CFG."""
    return pipe.generate(PROMPTS, seed=PER_PROMPT_SEEDS, height=32, width=32, steps=steps, sampler="euler_a",
                         schedule="trailing", guidance_scale=0.0)  # fmt: skip


def right(images) -> int:
    """How many images draw the prompt's shape and colour."""
    return score([(p, t, classify(im)) for p, t, im in zip(PROMPTS, WANTED, images)], (0, 1))[0]


def train_student(tmp_path, arg: str):
    from sdxl_jax.pipeline import Pipeline
    from sdxl_jax.train.loop import train

    config = demo_add.get_config(arg)
    config.data.path = str(tmp_path / "shapes")
    config.malloc_huge_pages = False  # train.py's restart: not in-process
    start = time.perf_counter()
    train(config, tmp_path / (arg or "add"))
    minutes = (time.perf_counter() - start) / 60
    return Pipeline.load(tmp_path / (arg or "add") / "export" / "sdxl_jax", dtype="fp32"), minutes


@pytest.mark.slow  # trains the demo student twice (~5 and ~4 min) and samples ~1500 images
def test_the_distilled_demo_draws_in_few_steps(tmp_path):
    from sdxl_jax.pipeline import Pipeline

    teacher = Pipeline.load(demo.SHIPPED, dtype="fp32")
    student, minutes = train_student(tmp_path, "")
    blurry, minutes_alone = train_student(tmp_path, "distill_only")
    n = len(PROMPTS)
    images = {"teacher, 40 steps": generate(teacher, PROMPTS, seed=PER_PROMPT_SEEDS)}
    for steps in (1, 2, 4):
        images[f"teacher, {steps} turbo steps"] = turbo(teacher, steps)
        images[f"ADD student, {steps} steps"] = turbo(student, steps)
        images[f"distillation alone, {steps} steps"] = turbo(blurry, steps)
    figures = {name: right(batch) for name, batch in images.items()}
    print(f"demo ADD: trained in {minutes:.1f} min (distillation alone {minutes_alone:.1f} min)")
    for name, count in figures.items():
        print(f"  {name}: {count}/{n}")
    rows = ("teacher, 40 steps", "ADD student, 1 steps", "ADD student, 2 steps", "ADD student, 4 steps",
            "distillation alone, 4 steps")  # fmt: skip
    picks = [k * len(SEEDS) for k in range(0, len(shapes.HELD_OUT), 3)][:8]  # one seed of every third prompt
    grid = np.concatenate([np.concatenate([images[r][i] for i in picks], axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(tmp_path / "grid.png")
    print(f"  grid (rows: {', '.join(rows)}): {tmp_path / 'grid.png'}")

    teacher_40 = figures["teacher, 40 steps"]
    assert figures["ADD student, 4 steps"] >= teacher_40 - 0.1 * n, figures
    assert figures["ADD student, 1 steps"] >= 0.6 * n, figures
