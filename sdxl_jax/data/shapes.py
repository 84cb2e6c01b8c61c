"""The demo's procedural dataset: one coloured shape on a plain background, at many sizes and aspects.

    write_shapes_folder(root, num_images=4000, seed=0)   # PNG + caption .txt pairs, an image folder
    make_shapes_loader(cfg, ...)                         # writes it if needed, then the grain loader

Captions read "a red circle on a blue background". Every image has its own original size (short side
24-96 px, aspect ratios 1:2 .. 2:1) and a random position and size of the shape, so aspect buckets,
upscaling of small images and random crops (and with them SDXL's size and crop conditioning) all occur.
Some (shape, colour, background) triples never appear in training (`HELD_OUT`); the demo's test
prompts the trained model with them. Images are drawn at 4x and box-downsampled (anti-aliased edges).
A dataset can draw other shapes and foreground colours than the demo model's (`data.shapes`,
`data.foregrounds`; a name listed twice is drawn twice as often): `NEW_SHAPES` and `NEW_COLOURS` are
ones the demo model never saw, for the demo LoRA (`configs/demo_lora.py`) to teach; `held_out(shapes,
foregrounds)` gives any vocabulary's held-out triples by the same rule.
"""

import itertools
import json
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
FOREGROUNDS = ("red", "green", "blue", "yellow", "purple", "orange")  # the demo model's
SHAPES = ("circle", "square", "triangle")  # the demo model's
NEW_COLOURS = {"pink": (245, 125, 200)}  # foregrounds the demo model never saw (never a background)
NEW_SHAPES = ("diamond",)  # shapes the demo model never saw
PALETTE = COLOURS | NEW_COLOURS
ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (1, 2), (2, 1))  # (h, w)
SUPERSAMPLE = 4
VERSION = 3  # of the generator; a folder written by another version is rewritten


def all_triples(shapes=SHAPES, foregrounds=FOREGROUNDS) -> list[tuple[str, str, str]]:
    """Every (shape, foreground, background) with different colours: 3 x 6 x 7 = 126 for the demo's."""
    return [(s, fg, bg) for s, fg, bg in itertools.product(shapes, foregrounds, COLOURS) if fg != bg]


def _held_out(shape: str, fg: str, bg: str) -> bool:
    s, f = (SHAPES + NEW_SHAPES).index(shape), (FOREGROUNDS + tuple(NEW_COLOURS)).index(fg)
    return (s + 2 * f + 3 * list(COLOURS).index(bg)) % 5 == 0


def held_out(shapes=SHAPES, foregrounds=FOREGROUNDS) -> tuple[tuple[str, str, str], ...]:
    return tuple(t for t in all_triples(shapes, foregrounds) if _held_out(*t))


def train_triples(shapes=SHAPES, foregrounds=FOREGROUNDS) -> tuple[tuple[str, str, str], ...]:
    """The triples a dataset of this vocabulary draws from (repeated names weigh their triples)."""
    return tuple(t for t in all_triples(shapes, foregrounds) if not _held_out(*t))


HELD_OUT = held_out()  # 23 of the 126; every shape and colour still seen
TRAIN_TRIPLES = train_triples()


def caption(shape: str, fg: str, bg: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


def render(shape: str, fg: str, bg: str, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image: the shape (size 60-84% of the short side, anywhere it fits) on the background."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (width * s, height * s), PALETTE[bg])
    short = min(height, width) * s
    r = rng.uniform(0.3, 0.42) * short  # half the shape's extent
    cy, cx = rng.uniform(r, height * s - r), rng.uniform(r, width * s - r)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[fg])
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[fg])
    elif shape == "triangle":  # upright, base and height 2r: half the bounding box
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=PALETTE[fg])
    elif shape == "diamond":  # a square on its corner, diagonals 2r: half the bounding box, symmetric
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=PALETTE[fg])
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES + NEW_SHAPES}")
    return image.resize((width, height), Image.Resampling.BOX)


def example(
    i: int, seed: int, shapes=SHAPES, foregrounds=FOREGROUNDS
) -> tuple[tuple[str, str, str], int, int, np.random.Generator]:
    """The triple (of the vocabulary's training triples), original (height, width) and the drawing rng of
    image i."""
    rng = np.random.default_rng([seed, i])
    triples = train_triples(shapes, foregrounds)
    triple = triples[int(rng.integers(len(triples)))]
    ah, aw = ASPECTS[int(rng.integers(len(ASPECTS)))]
    short = int(rng.integers(24, 97))
    unit = short / min(ah, aw)
    return triple, round(ah * unit), round(aw * unit), rng


def write_shapes_folder(
    root: str | Path,
    num_images: int = 4000,
    seed: int = 0,
    progress: bool = True,
    shapes=SHAPES,
    foregrounds=FOREGROUNDS,
) -> Path:
    """Write the dataset as an image folder (`NNNNN.png` + `NNNNN.txt`) of `shapes` in `foregrounds`; a
    complete folder of the same (num_images, seed, vocabulary, version) is left as it is. The marker
    file is written last."""
    root = Path(root)
    marker = root / "shapes.json"
    spec = {"num_images": num_images, "seed": seed, "version": VERSION}
    if (tuple(shapes), tuple(foregrounds)) != (SHAPES, FOREGROUNDS):
        spec |= {"shapes": list(shapes), "foregrounds": list(foregrounds)}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    root.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"writing {num_images} procedural images to {root}/ ...", flush=True)
    for i in range(num_images):
        (shape, fg, bg), h, w, rng = example(i, seed, tuple(shapes), tuple(foregrounds))
        render(shape, fg, bg, h, w, rng).save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(caption(shape, fg, bg) + "\n")
    marker.write_text(json.dumps(spec))
    return root


def make_shapes_loader(cfg: ml_collections.ConfigDict, **kwargs):
    """`data.source = "shapes"`: write the folder at `cfg.path` if needed, then read it with the grain
    loader (`cfg.num_images`, `cfg.shapes_seed`, and `cfg.shapes` and `cfg.foregrounds`, comma-separated,
    pick the dataset; the rest is the folder loader's config)."""
    from sdxl_jax.data.loader import make_loader

    if not cfg.path:
        raise ValueError("data.path: where the demo's shapes folder goes (written once, reused)")
    shapes = tuple(s.strip() for s in cfg.shapes.split(","))
    foregrounds = tuple(s.strip() for s in cfg.foregrounds.split(","))
    if unknown := set(shapes) - set(SHAPES + NEW_SHAPES):
        raise ValueError(f"data.shapes: unknown {sorted(unknown)}; known: {SHAPES + NEW_SHAPES}")
    if unknown := set(foregrounds) - set(FOREGROUNDS + tuple(NEW_COLOURS)):
        raise ValueError(f"data.foregrounds: unknown {sorted(unknown)}; known: {FOREGROUNDS + tuple(NEW_COLOURS)}")
    write_shapes_folder(cfg.path, cfg.num_images, cfg.shapes_seed, shapes=shapes, foregrounds=foregrounds)
    folder = cfg.copy_and_resolve_references()
    with folder.unlocked():
        folder.source = "folder"
    return make_loader(folder, **kwargs)
