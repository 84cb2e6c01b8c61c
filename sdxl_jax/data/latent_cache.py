"""`prepare --cache_latents`: the VAE posterior and both text encoders' outputs, computed once.

For each record: the centre crop of its bucket (a cached latent cannot be re-cropped or flipped, so
the crop is fixed at prepare time and recorded as `crop_top_left`) goes through the VAE encoder, and
one caption (picked with an rng seeded by (caption_seed, record id); tag shuffling is not possible
after encoding) through the text encoders. Stored per record, float16:

    latent_moments [H/8, W/8, 8]  posterior mean ‖ logvar, unscaled (the trainer samples and scales)
    context        [77, 2048]     CLIP-L ‖ bigG penultimate states ([77, 1280] for a refiner checkpoint)
    pooled         [1280]         bigG projected end-token state

Work is batched per bucket in fixed-size micro-batches (padded, so each bucket compiles once) and
each finished micro-batch is handed straight to the shard writer: memory holds at most one
micro-batch per bucket, never a dataset's embeddings.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import conditioning
from sdxl_jax.models.pixel_space import first_stage
from sdxl_jax.tokenizer import TokenPair, tokenize_pair


@functools.partial(jax.jit, static_argnums=0)
def _vae_moments(cfg, params, x: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` in [-1, 1] -> `[B, H/8, W/8, 8]` (module-level jit: compiled once per shape, shared)."""
    return first_stage(cfg).apply({"params": params}, x, method="moments")


_encode_text = jax.jit(conditioning.encode_text)


class LatentEncoder:
    """Frozen VAE encoder + text encoders from one checkpoint (`convert.load_pipeline_weights`)."""

    def __init__(self, checkpoint: str, batch_size: int = 4):
        from sdxl_jax.convert import load_pipeline_weights

        weights = load_pipeline_weights(checkpoint)
        self.model = weights.model
        self.vae_cfg, vae_params = weights.components["vae"]
        cfg_l, params_l = weights.components.get("text_encoder", (None, None))
        cfg_g, params_g = weights.components["text_encoder_2"]
        self.encoders = conditioning.TextEncoders(cfg_g=cfg_g, params_g=params_g, cfg_l=cfg_l, params_l=params_l)
        self.vae_params = jax.tree_util.tree_map(jnp.asarray, vae_params)
        self.batch_size = batch_size
        self.factor = self.vae_cfg.downsample_factor

    def _pad(self, x: np.ndarray) -> np.ndarray:
        pad = self.batch_size - len(x)
        return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

    def encode(self, pixels: np.ndarray, texts: list[str]) -> dict:
        """uint8 `[n, H, W, 3]` (n <= batch_size, one bucket) and n texts -> float16 arrays per example:
        latent_moments `[n, H/8, W/8, 8]`, context `[n, 77, D]`, pooled `[n, P]`; and int32 token ids."""
        n = len(pixels)
        if not 0 < n <= self.batch_size or len(texts) != n:
            raise ValueError(f"{n} images and {len(texts)} texts for a micro-batch of {self.batch_size}")
        x = self._pad(pixels).astype(np.float32) / 127.5 - 1.0
        moments = np.asarray(_vae_moments(self.vae_cfg, self.vae_params, x))[:n]
        tok = tokenize_pair(texts + [""] * (self.batch_size - n))
        context, pooled = _encode_text(self.encoders, TokenPair(*(jnp.asarray(t) for t in tok)))
        out = dict(latent_moments=moments, context=np.asarray(context)[:n], pooled=np.asarray(pooled)[:n])
        out = {k: v.astype(np.float16) for k, v in out.items()}
        out |= {k: np.asarray(getattr(tok, k))[:n].astype(np.int32) for k in ("ids_l", "ids_g", "eot_l", "eot_g")}
        if not all(np.isfinite(out[k]).all() for k in ("latent_moments", "context", "pooled")):
            raise FloatingPointError("non-finite latents or text states (float16 overflow?): refusing to write them")
        return out


class BucketBatcher:
    """Collects examples per bucket and calls `flush(bucket, items)` with each full micro-batch."""

    def __init__(self, batch_size: int, flush: Callable[[int, list], None]):
        self.batch_size, self.flush = batch_size, flush
        self.pending: dict[int, list] = {}

    def add(self, bucket: int, item) -> None:
        items = self.pending.setdefault(bucket, [])
        items.append(item)
        if len(items) == self.batch_size:
            self.flush(bucket, self.pending.pop(bucket))

    def finish(self) -> None:
        for bucket in sorted(self.pending):
            self.flush(bucket, self.pending.pop(bucket))
