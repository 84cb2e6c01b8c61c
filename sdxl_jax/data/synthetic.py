"""A deterministic, checkpointable in-memory data source with the loader's batch contract.

Used by the tiny config and the trainer's tests, and as a stand-in wherever real data is not needed.
Every batch is one bucket (buckets alternate between steps, as in SDXL's multi-aspect training) and is
*this process's* rows of the global batch, as a dict of numpy arrays:

    images           uint8   [B, H, W, 3]       (or, with `cached_latents`, the three below instead)
    latent_moments   float32 [B, H/8, W/8, 8]   VAE posterior mean ‖ logvar, unscaled
    context          float32 [B, 77, context_dim]
    pooled           float32 [B, pooled_dim]
    ids_l, ids_g     int32   [B, 77]            `tokenize_pair` of the caption
    eot_l, eot_g     int32   [B]
    original_size    int32   [B, 2]             (h, w) before the (simulated) resize
    crop_top_left    int32   [B, 2]
    target_size      int32   [B, 2]             the bucket's (h, w)
    drop_text        bool    [B]                caption dropout for classifier-free guidance
    aesthetic_score  float32 [B]

B = global_batch_size / process_count. Global batch k holds examples `perm_e[(k*G + j) % N]`
(j < G, epoch e = (k*G + j) // N, a seeded permutation per epoch) rendered at bucket `k % len(buckets)`;
process p takes rows [p*B, (p+1)*B). Everything is a function of (seed, k, j), so the iterator's whole
state is the index of the next global batch: `get_state()` / `set_state()` (bytes, as grain's
`DataLoaderIterator`, so grain's Orbax handler checkpoints it).
"""

import json

import ml_collections
import numpy as np

from sdxl_jax.tokenizer import tokenize_pair

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "purple": (150, 50, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "stripe")
LATENT_FACTOR = 8


def caption(example: int) -> tuple[str, str, str]:
    """(shape, foreground colour, background colour) of example `example`; fixed for all seeds."""
    names = list(COLOURS)
    shape = SHAPES[example % len(SHAPES)]
    fg = names[(example // len(SHAPES)) % len(names)]
    bg = names[(example // len(SHAPES) + 3 + example % 2) % len(names)]
    return shape, fg, bg


def caption_text(example: int) -> str:
    shape, fg, bg = caption(example)
    return f"a {fg} {shape} on a {bg} background"


def render(example: int, height: int, width: int) -> np.ndarray:
    """The procedural image of an example: uint8 `[H, W, 3]`, a shape in one colour on another."""
    shape, fg, bg = caption(example)
    rng = np.random.default_rng(example)
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    radius = rng.uniform(0.15, 0.3)
    y = (np.arange(height)[:, None] + 0.5) / height
    x = (np.arange(width)[None, :] + 0.5) / width
    if shape == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
    elif shape == "square":
        mask = (np.abs(y - cy) < radius) & (np.abs(x - cx) < radius)
    else:
        mask = np.broadcast_to(np.abs(x - cx) < radius / 2, (height, width))
    image = np.where(mask[..., None], np.array(COLOURS[fg], np.uint8), np.array(COLOURS[bg], np.uint8))
    return image.astype(np.uint8)


def _uniform(seed: int, *keys: int) -> float:
    """A deterministic uniform [0, 1) from integers."""
    return float(np.random.default_rng([seed, *keys]).random())


class SyntheticIterator:
    """Iterator over this process's slice of each global batch; see the module docstring."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        *,
        seed: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes")
        for h, w in cfg.buckets:
            if h % LATENT_FACTOR or w % LATENT_FACTOR:
                raise ValueError(f"bucket {h}x{w} is not a multiple of the VAE factor {LATENT_FACTOR}")
        self.cfg, self.seed = cfg, seed
        self.global_batch_size, self.local_batch_size = global_batch_size, global_batch_size // process_count
        self.process_index = process_index
        self.next_batch = 0
        tokens = tokenize_pair([caption_text(i) for i in range(cfg.num_examples)])
        self.tokens = {"ids_l": tokens.ids_l, "ids_g": tokens.ids_g, "eot_l": tokens.eot_l, "eot_g": tokens.eot_g}

    def __iter__(self):
        return self

    def _examples(self, k: int) -> np.ndarray:
        """Example ids of this process's rows of global batch k: int `[B]`."""
        n, g = self.cfg.num_examples, self.global_batch_size
        rows = k * g + self.process_index * self.local_batch_size + np.arange(self.local_batch_size)
        epochs, positions = rows // n, rows % n
        perms = {e: np.random.default_rng([self.seed, int(e)]).permutation(n) for e in np.unique(epochs)}
        return np.array([perms[e][p] for e, p in zip(epochs, positions)])

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Global batch k, this process's rows (does not move the iterator)."""
        cfg = self.cfg
        h, w = cfg.buckets[k % len(cfg.buckets)]
        examples = self._examples(k)
        rows = self.process_index * self.local_batch_size + np.arange(self.local_batch_size)
        out = {name: ids[examples] for name, ids in self.tokens.items()}
        scale = np.array([1.0 + 2.0 * _uniform(self.seed, 1, int(e)) for e in examples])
        out["original_size"] = np.stack([np.round(h * scale), np.round(w * scale)], -1).astype(np.int32)
        crops = [(int(8 * _uniform(self.seed, 2, k, int(r))), int(8 * _uniform(self.seed, 3, k, int(r)))) for r in rows]
        out["crop_top_left"] = np.array(crops, np.int32).reshape(-1, 2)
        out["target_size"] = np.tile(np.array([[h, w]], np.int32), (len(examples), 1))
        out["drop_text"] = np.array([_uniform(self.seed, 4, k, int(r)) < cfg.caption_dropout for r in rows], bool)
        out["aesthetic_score"] = np.array([4.0 + 3.0 * _uniform(self.seed, 5, int(e)) for e in examples], np.float32)
        if cfg.cached_latents:
            out |= self._cached(examples, h, w)
        else:
            out["images"] = np.stack([render(int(e), h, w) for e in examples])
        return out

    def _cached(self, examples: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
        """Stand-ins for pre-encoded latents and text: fixed per example, independent of the bucket
        for the text, a smooth function of the image for the latent mean."""
        moments, context, pooled = [], [], []
        for e in examples:
            image = render(int(e), h, w).astype(np.float32) / 127.5 - 1.0
            pooled_image = image.reshape(h // LATENT_FACTOR, LATENT_FACTOR, w // LATENT_FACTOR, LATENT_FACTOR, 3).mean(
                (1, 3)
            )
            mean = np.concatenate([pooled_image, pooled_image.mean(-1, keepdims=True)], -1) * 5.0
            moments.append(np.concatenate([mean, np.full_like(mean, -6.0)], -1))
            rng = np.random.default_rng([self.seed, 6, int(e)])
            context.append(rng.standard_normal((77, self.cfg.context_dim), np.float32))
            pooled.append(rng.standard_normal((self.cfg.pooled_dim,), np.float32))
        return {
            "latent_moments": np.stack(moments).astype(np.float32),
            "context": np.stack(context),
            "pooled": np.stack(pooled),
        }

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self.next_batch)
        self.next_batch += 1
        return out

    def get_state(self) -> bytes:
        return json.dumps(
            {"next_batch": self.next_batch, "seed": self.seed, "global_batch_size": self.global_batch_size}
        ).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if (state["seed"], state["global_batch_size"]) != (self.seed, self.global_batch_size):
            raise ValueError(
                f"data state for seed {state['seed']}, global batch {state['global_batch_size']}; "
                f"this run has seed {self.seed}, global batch {self.global_batch_size}"
            )
        self.next_batch = int(state["next_batch"])

    def start_prefetch(self) -> None:
        """grain's Orbax handler calls this after `set_state`; nothing is prefetched here."""

    def close(self) -> None:
        """Like the grain loader's (which stops its workers); nothing to release here."""


def make_synthetic(
    cfg: ml_collections.ConfigDict, *, seed: int, global_batch_size: int, process_index: int, process_count: int
) -> SyntheticIterator:
    """cfg: `num_examples`, `buckets` ((h, w) pixels), `caption_dropout`, `cached_latents`, `context_dim`,
    `pooled_dim`."""
    return SyntheticIterator(
        cfg, seed=seed, global_batch_size=global_batch_size, process_index=process_index, process_count=process_count
    )
