"""The demo LoRA (`configs/demo_lora.py`) teaches the shipped demo model a colour it never saw (pink).

Trains the LoRA as the README's command does (in this process), then reads the images back with
`tests/helpers/shape_reader.py`: on held-out pink prompts ((shape, background) pairs the LoRA never saw
in pink) the base model draws nothing pink and the LoRA draws the pink shape on most; the demo's own
held-out prompts still come out about as well as without the LoRA. The figures are printed for the README.
"""

import time

import numpy as np
import pytest

from configs import demo, demo_lora
from sdxl_jax.data import shapes
from tests.helpers.shape_reader import classify, generate, score

SEEDS = (100, 200, 300, 400, 500)  # per prompt
NEW = shapes.held_out(shapes.SHAPES, tuple(shapes.NEW_COLOURS))  # the 5 held-out pink triples


def read_back(pipe, triples) -> list:
    prompts = [shapes.caption(*t) for t in triples for _ in SEEDS]
    images = generate(pipe, prompts, seed=[seed + i for i in range(len(triples)) for seed in SEEDS])
    wanted = [t for t in triples for _ in SEEDS]
    return [
        (p, t, classify(image, shapes.SHAPES, tuple(shapes.PALETTE))) for p, t, image in zip(prompts, wanted, images)
    ]


@pytest.mark.slow  # trains the demo LoRA (~3 min) and samples 140 images twice
def test_the_demo_lora_teaches_a_new_colour_and_keeps_the_old_prompts(tmp_path):
    from sdxl_jax.pipeline import Pipeline
    from sdxl_jax.train.loop import train

    config = demo_lora.get_config()
    config.data.path = str(tmp_path / "shapes")
    config.malloc_huge_pages = False  # train.py's restart: not in-process
    start = time.perf_counter()
    train(config, tmp_path / "run")
    minutes = (time.perf_counter() - start) / 60
    lora = tmp_path / "run" / "export" / "lora.safetensors"

    base = Pipeline.load(demo.SHIPPED, dtype="fp32")
    with_lora = Pipeline.load(demo.SHIPPED, dtype="fp32", loras=[(str(lora), 1.0)])
    new_base, new_lora = read_back(base, NEW), read_back(with_lora, NEW)
    old_base, old_lora = read_back(base, shapes.HELD_OUT), read_back(with_lora, shapes.HELD_OUT)
    figures = {
        "pink, base": score(new_base, (1,))[0], "pink, LoRA": score(new_lora, (1,))[0],
        "pink + shape, LoRA": score(new_lora, (0, 1))[0],
        "old shapes + colour, base": score(old_base, (0, 1))[0],
        "old shapes + colour, LoRA": score(old_lora, (0, 1))[0],
    }  # fmt: skip
    n_new, n_old = len(new_base), len(old_base)
    print(f"demo LoRA: trained in {minutes:.1f} min; file {lora.stat().st_size / 1e3:.0f} kB")
    for name, right in figures.items():
        print(f"  {name}: {right}/{n_old if 'old' in name else n_new}")
    report = score(new_lora, (0, 1))[1]
    assert figures["pink, base"] == 0, score(new_base, (1,))[1]  # the base model draws nothing pink
    assert figures["pink + shape, LoRA"] >= 0.6 * n_new, report  # most held-out pink prompts
    assert figures["old shapes + colour, LoRA"] >= figures["old shapes + colour, base"] - 0.1 * n_old
    assert np.isfinite(minutes)
