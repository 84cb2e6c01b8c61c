"""Tiled VAE decode and encode: large images in bounded memory.

The latent (or image) is cut into overlapping tiles of one fixed size, each tile goes through the
ordinary decoder (encoder) on its own, and the outputs are blended with weights that ramp linearly
across every overlap, like diffusers' `tiled_decode`. Unlike diffusers, the tiles are spaced evenly so
that all have the same shape (one compiled body, any image size), and overlapping weights are
normalised by their sum, so every output pixel is a convex combination of tile outputs.

Peak memory: the tiles run one after another in a `lax.fori_loop`, whose body XLA compiles once and
whose temporaries it reuses, so the peak is one tile's working set plus the input and an
output-sized fp32 accumulator, whatever the image size. For the SDXL decoder with 64-latent tiles
(512 px) in fp32 the working set is dominated by the 512x512x128 activations of the last up block
(128 MiB each per image, a few alive at once) and the mid-block attention's 4096x4096 logits (64 MiB).
An untiled 2048x2048 decode instead needs 16x the activations and a 65536x65536 logit matrix (16 GiB
per image in fp32).

Tiling is not exact: GroupNorm statistics and the mid-block attention see only their tile, and the
convolutions see zero padding at tile edges. The overlap and blending hide the seams.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


def tile_starts(length: int, tile: int, min_overlap: int) -> list[int]:
    """Starts of the fewest tiles of size `tile`, evenly spaced, that cover `[0, length)` with
    neighbours overlapping by at least `min_overlap`. One tile (at 0) when `length <= tile`."""
    if length <= tile:
        return [0]
    stride = tile - min_overlap
    if stride <= 0:
        raise ValueError(f"overlap {min_overlap} leaves no stride for tiles of {tile}")
    n = math.ceil((length - min_overlap) / stride)  # the least n with (n - 1) * stride + tile >= length
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _axis_plan(length: int, tile: int, min_overlap: int, out_scale: int):
    """Along one axis, in input units: (tile starts, tile size, per-tile output weights `[n, size *
    out_scale]`, their placed sum `[length * out_scale]`)."""
    starts = tile_starts(length, tile, min_overlap)
    size = min(tile, length)
    n, out = len(starts), size * out_scale
    # Ramp length: the smallest actual overlap, so each ramp lies inside the neighbour's tile.
    ramp = min((size - (b - a) for a, b in zip(starts, starts[1:])), default=0) * out_scale
    up = (np.arange(ramp) + 0.5) / max(ramp, 1)  # strictly positive: every pixel keeps some weight
    weights = np.ones((n, out), np.float32)
    for k in range(n):
        if k > 0:
            weights[k, :ramp] = np.minimum(weights[k, :ramp], up)
        if k < n - 1:
            weights[k, out - ramp :] = np.minimum(weights[k, out - ramp :], up[::-1])
    total = np.zeros(length * out_scale, np.float32)
    for s, w in zip(starts, weights):
        total[s * out_scale : s * out_scale + out] += w
    return starts, size, weights, total


def tiled_map(fn, x: jax.Array, tile: int, overlap: float, in_scale: int, out_scale: int) -> jax.Array:
    """Applies `fn` to overlapping tiles of `x` and blends the results.

    x: `[B, H, W, C]` with H, W multiples of `in_scale`; positions are counted in units of `in_scale`
    input pixels = `out_scale` output pixels (latent pixels, for the VAE). fn: `[B, t*in_scale,
    t'*in_scale, C]` -> `[B, t*out_scale, t'*out_scale, C']` -> fp32 `[B, H/in_scale*out_scale, ...]`.
    """
    if tile < 1 or not 0 <= overlap < 1:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < 1, got tile={tile}, overlap={overlap}")
    b, h, w, c = x.shape
    if h % in_scale or w % in_scale:
        raise ValueError(f"input size {h}x{w} is not a multiple of {in_scale}")
    min_overlap = round(tile * overlap)
    (sy, ty, wy, totaly), (sx, tx, wx, totalx) = (
        _axis_plan(n, tile, min_overlap, out_scale) for n in (h // in_scale, w // in_scale)
    )
    tile_shape = (b, ty * in_scale, tx * in_scale, c)
    out_c = jax.eval_shape(fn, jax.ShapeDtypeStruct(tile_shape, x.dtype)).shape[-1]
    starts_y, starts_x = jnp.asarray(sy), jnp.asarray(sx)
    wy, wx = jnp.asarray(wy), jnp.asarray(wx)

    def body(k, acc):
        i, j = k // len(sx), k % len(sx)
        y0, x0 = starts_y[i], starts_x[j]
        piece = fn(jax.lax.dynamic_slice(x, (0, y0 * in_scale, x0 * in_scale, 0), tile_shape))
        weight = (wy[i][:, None] * wx[j][None, :])[None, :, :, None]
        corner = (0, y0 * out_scale, x0 * out_scale, 0)
        region = jax.lax.dynamic_slice(acc, corner, piece.shape)
        return jax.lax.dynamic_update_slice(acc, region + weight * piece.astype(jnp.float32), corner)

    acc = jnp.zeros((b, len(totaly), len(totalx), out_c), jnp.float32)
    acc = jax.lax.fori_loop(0, len(sy) * len(sx), body, acc)
    return acc / jnp.asarray(np.outer(totaly, totalx))[None, :, :, None]


@functools.partial(jax.jit, static_argnames=("cfg", "tile", "overlap"))
def tiled_decode(cfg: VAEConfig, params, z: jax.Array, *, tile: int = 64, overlap: float = 0.25) -> jax.Array:
    """`AutoencoderKL.decode` tile by tile. z: unscaled latent `[B, h, w, latent_channels]` -> fp32
    `[B, f*h, f*w, out_channels]`. tile: side in latent pixels (64 = 512 image pixels); overlap: the
    least fraction of a tile shared with each neighbour. Equals `decode` when h, w <= tile."""
    vae = AutoencoderKL(cfg)
    decode = lambda t: vae.apply({"params": params}, t, method=AutoencoderKL.decode)
    return tiled_map(decode, z, tile, overlap, in_scale=1, out_scale=cfg.downsample_factor)


@functools.partial(jax.jit, static_argnames=("cfg", "tile", "overlap"))
def tiled_encode(cfg: VAEConfig, params, x: jax.Array, *, tile: int = 64, overlap: float = 0.25) -> DiagonalGaussian:
    """`AutoencoderKL.encode` tile by tile: x `[B, H, W, in_channels]` -> the posterior over
    `[B, H/f, W/f, latent_channels]`. tile is in latent pixels (64 = 512 image pixels). As in
    diffusers, the raw moments are blended, then logvar is clamped."""
    vae = AutoencoderKL(cfg)
    moments = lambda t: vae.apply({"params": params}, t, method=AutoencoderKL.moments)
    f = cfg.downsample_factor
    return DiagonalGaussian.from_moments(tiled_map(moments, x, tile, overlap, in_scale=f, out_scale=1))
