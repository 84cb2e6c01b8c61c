"""Reading the demo's images back: which shape, which colours (pixel statistics, no model).

The background is the border's median colour; the foreground is every pixel nearer the foreground's
colour than the background's; its colour is the nearest named colour. Its shape, within its bounding
box: a triangle (upright) is much narrower in its top quarter than in its bottom quarter; a square
fills the box's corners; a circle leaves them empty and fills about pi/4 of the box, a diamond (when
asked to tell one apart: `shapes` includes it) about half. Colours are the nearest of those asked for
(the demo's eight by default; add `shapes.NEW_COLOURS` to read them).
"""

import numpy as np

from configs import demo
from sdxl_jax.data import shapes as demo_shapes


def nearest_colour(rgb: np.ndarray, names) -> str:
    palette = np.array([demo_shapes.PALETTE[n] for n in names], np.float64)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def classify(
    image: np.ndarray, shapes=demo_shapes.SHAPES, colours=tuple(demo_shapes.COLOURS)
) -> tuple[str | None, str | None, str]:
    """uint8 `[H, W, 3]` -> (shape, foreground colour, background colour) among `shapes` and `colours`;
    None where no shape stands out."""
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    rough = np.linalg.norm(img - bg, axis=-1) > 60
    if rough.sum() < 4:
        return None, None, nearest_colour(bg, colours)
    fg = np.median(img[rough], axis=0)
    direction = fg - bg
    mask = (img - bg) @ direction > 0.5 * direction @ direction  # nearer fg than bg along bg -> fg
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64)
    h, w = box.shape
    q = max(1, h // 4)
    top, bottom = box[:q].sum(1).mean(), box[-q:].sum(1).mean()
    c = max(1, round(min(h, w) / 5))
    corners = np.mean([box[:c, :c].mean(), box[:c, -c:].mean(), box[-c:, :c].mean(), box[-c:, -c:].mean()])
    if top < 0.6 * bottom:
        shape = "triangle"
    elif corners > 0.5:
        shape = "square"
    elif "diamond" in shapes and box.mean() < 0.65:
        shape = "diamond"
    else:
        shape = "circle"
    return shape, nearest_colour(fg, colours), nearest_colour(bg, colours)


def score(results, parts) -> tuple[int, str]:
    """results: (prompt, wanted triple, read triple) -> (how many agree on `parts` (indices), a report)."""
    right = [[got[i] for i in parts] == [want[i] for i in parts] for _, want, got in results]
    report = "\n".join(f"{'ok ' if ok else 'BAD'} {p!r}: got {got}" for (p, _, got), ok in zip(results, right))
    return sum(right), report


def generate(pipe, prompts, seed=0, **micro) -> np.ndarray:
    """uint8 `[N, 32, 32, 3]`: `prompts` sampled as the demo samples (`configs/demo.py` OPTIONS)."""
    s = demo.sampling()
    return pipe.generate(prompts, seed=seed, height=s.height, width=s.width, steps=s.steps, sampler=s.sampler,
                         schedule=s.schedule, guidance_scale=s.guidance_scale, **micro)  # fmt: skip
