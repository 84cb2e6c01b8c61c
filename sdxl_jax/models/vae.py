"""The SDXL VAE (diffusers' `AutoencoderKL`, f=8) as one Linen module configured by `VAEConfig`.

Layout (diffusers' names, which the converter maps 1:1):
  encoder: conv_in -> down_blocks_i (resnets_j, downsampler) -> mid_block -> conv_norm_out -> conv_out
           -> quant_conv -> moments (mean, logvar)
  decoder: post_quant_conv -> conv_in -> mid_block -> up_blocks_i (resnets_j, upsampler)
           -> conv_norm_out -> conv_out
with mid_block = resnets_0 -> attentions_0 (single-head self-attention over pixels) -> resnets_1.

Images are NHWC in [-1, 1]. The model works in *unscaled* latents; `to_latents` / `from_latents`
apply the config's scaling (and shift) factor at the boundary with the diffusion model.
Large images: see `sdxl_jax.models.vae_tiling`.
"""

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.attention import Attention
from sdxl_jax.models.config import ModelConfig, abstract_params_of, check_norm_groups, check_positive
from sdxl_jax.models.layers import (
    Downsample,
    Dtype,
    GroupNorm,
    ResBlock,
    conv,
    conv_bias_init,
    conv_kernel_init,
    param_count,
    spatial_boundary,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """Hyper-parameters of an AutoencoderKL; levels are indexed from the full-resolution one (level 0).

    The defaults are the SDXL VAE (83,653,863 parameters).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder level; decoder levels have one more
    norm_groups: int = 32
    norm_eps: float = 1e-6  # every GroupNorm of the VAE
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.13025  # latents seen by the UNet = (z - shift_factor) * scaling_factor
    shift_factor: float | None = None
    sample_size: int = 1024  # diffusers' training resolution (pixels); informational only
    dtype: str = "float32"  # compute; fp32 by default because the SDXL VAE overflows in fp16
    param_dtype: str = "float32"
    attention: str = "xla"  # a key of ATTENTION_IMPLS

    def validate(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one level")
        check_norm_groups(self.block_out_channels, self.norm_groups)
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        check_positive("scaling_factor", self.scaling_factor)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side; image H and W must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sdxl(cls, **overrides) -> "VAEConfig":
        """The SDXL base/refiner VAE (the same architecture): 83,653,863 parameters."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """An SDXL-shaped VAE for CPU tests: four levels (f=8), every channel change, a mid attention."""
        fields = dict(block_out_channels=(16, 32, 64, 64), norm_groups=8, sample_size=64)
        return cls(**(fields | overrides))


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior N(mean, exp(logvar)); both fp32 `[B, h, w, latent_channels]`.

    A pytree, so it can leave a `jax.jit`.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """moments: `[B, h, w, 2 * latent]` (mean channels first, then logvar) -> the distribution.

        logvar is clamped to [-30, 20] as diffusers does, so `exp` stays finite.
        """
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterised draw `mean + std * eps`, `[B, h, w, latent]`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


def check_images(x: jax.Array, channels: int, factor: int) -> None:
    """Loud errors for first-stage input that is not `[B, H, W, channels]` with H, W multiples of `factor`."""
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"images must be [B, H, W, {channels}] (NHWC), got shape {x.shape}")
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the first stage's factor {factor}")


def check_latents(z: jax.Array, channels: int) -> None:
    if z.ndim != 4 or z.shape[-1] != channels:
        raise ValueError(f"latents must be [B, h, w, {channels}] (NHWC), got shape {z.shape}")


def to_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """VAE latent (a posterior sample or mean) -> the latent the diffusion model sees."""
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def from_latents(latents: jax.Array, cfg: VAEConfig) -> jax.Array:
    """The inverse of `to_latents`: diffusion latent -> what `AutoencoderKL.decode` takes."""
    return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)


def _phase_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """A 3-tap kernel axis -> the 2-tap kernels for even and odd outputs of nearest-x2 + conv.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: taps (k0, k1 + k2) on
    rows (i-1, i). Output row 2i+1 reads 2i, 2i+1, 2i+2 = input rows i, i, i+1: (k0 + k1, k2) on (i, i+1).
    """
    k0, k1, k2 = jnp.split(kernel, 3, axis=axis)
    return jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis)


class _NearestX2Conv3x3(nn.Module):
    """conv3x3 (padding 1) of the nearest-neighbour x2 upsampled input, without building that input.

    The four output phases (row parity a, column parity b) are 2x2 convs of the input padded by 1,
    computed as one conv with 4x the output channels; phase (a, b) is that output shifted by (a, b).
    2.25x fewer FLOPs than upsample-then-conv (16 vs 36 taps per input pixel and channel pair): the
    SDXL decoder at 512x512 needs 2.12 instead of 2.51 TFLOP.
    The parameters are a plain conv3x3's, `kernel` `[3, 3, C, out]` and `bias` `[out]`.
    """

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, H, W, C]` -> `[B, 2H, 2W, features]`."""
        b, h, w, c = x.shape
        kernel = self.param("kernel", conv_kernel_init(), (3, 3, c, self.features), self.param_dtype)
        bias = self.param("bias", conv_bias_init(), (self.features,), self.param_dtype)
        phases = [kw for kh in _phase_taps(kernel, 0) for kw in _phase_taps(kh, 1)]  # (a, b) = 00, 01, 10, 11
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            jnp.concatenate(phases, axis=-1).astype(self.dtype),  # [2, 2, C, 4 * out]
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # [B, H + 1, W + 1, 4 * out]
        o = self.features
        part = lambda a, b_: y[:, a : a + h, b_ : b_ + w, (2 * a + b_) * o : (2 * a + b_ + 1) * o]
        rows = [jnp.stack([part(a, 0), part(a, 1)], axis=3).reshape(b, h, 2 * w, o) for a in (0, 1)]
        return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o) + bias.astype(self.dtype)


class VAEUpsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3: the maths and parameters of `layers.Upsample`, computed
    by `_NearestX2Conv3x3`. `[B, H, W, C]` -> `[B, 2H, 2W, C]`."""

    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _NearestX2Conv3x3(x.shape[-1], self.dtype, self.param_dtype, name="conv")(x)


class VAEAttention(nn.Module):
    """GroupNorm -> single-head self-attention over all pixels (biased q/k/v/out projections) -> residual.

    diffusers' `Attention` with a `group_norm` and `residual_connection`, built with `heads = channels //
    attention_head_dim = 1`, so the head is `channels` wide. Its `group_norm` sits beside the projections:
    the `Attention` shares this module's scope, so the parameters are `group_norm`, `to_q`, `to_k`,
    `to_v`, `to_out_0` side by side.
    """

    channels: int
    norm_groups: int
    norm_eps: float
    implementation: str
    dtype: Dtype
    param_dtype: Dtype

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.group_norm = GroupNorm(self.norm_groups, self.norm_eps, **kw)
        self.attention = Attention(1, self.channels, self.implementation, qkv_bias=True, **kw)
        nn.share_scope(self, self.attention)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, H, W, channels]` -> `[B, H, W, channels]`."""
        b, h, w, c = x.shape
        out = self.attention(self.group_norm(x).reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


def _resblock(cfg: VAEConfig, channels: int, name: str) -> ResBlock:
    return ResBlock(channels, cfg.norm_groups, cfg.norm_eps, name=name, **cfg.dtypes)


class MidBlock(nn.Module):
    """resnet -> attention (if `cfg.mid_block_attention`) -> resnet at the lowest resolution."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """h: `[B, H, W, C_last]` -> same shape."""
        cfg, ch, kw = self.cfg, self.cfg.block_out_channels[-1], self.cfg.dtypes
        h = _resblock(cfg, ch, "resnets_0")(h)
        if cfg.mid_block_attention:
            attention = VAEAttention(ch, cfg.norm_groups, cfg.norm_eps, cfg.attention, name="attentions_0", **kw)
            h = attention(h)
        return spatial_boundary(_resblock(cfg, ch, "resnets_1")(h))


class DownEncoderBlock(nn.Module):
    """One encoder level: `layers_per_block` resnets, then a stride-2 downsample unless last."""

    cfg: VAEConfig
    level: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """h: `[B, H, W, C_prev]` -> `[B, H/2, W/2, C]` (`[B, H, W, C]` at the last level)."""
        cfg, ch = self.cfg, self.cfg.block_out_channels[self.level]
        for j in range(cfg.layers_per_block):
            h = _resblock(cfg, ch, f"resnets_{j}")(h)
        if self.level < len(cfg.block_out_channels) - 1:
            # diffusers' Downsample2D(padding=0): one row and column of zeros at the bottom/right only
            h = Downsample(padding=((0, 1), (0, 1)), name="downsampler", **cfg.dtypes)(h)
        return spatial_boundary(h)


class UpDecoderBlock(nn.Module):
    """One decoder level: `layers_per_block + 1` resnets, then nearest x2 + conv3x3 unless level 0.

    `up` counts decoder blocks from the lowest resolution, like diffusers' `up_blocks` index.
    """

    cfg: VAEConfig
    up: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """h: `[B, H, W, C_prev]` -> `[B, 2H, 2W, C]` (`[B, H, W, C]` for the last block)."""
        cfg = self.cfg
        ch = tuple(reversed(cfg.block_out_channels))[self.up]
        for j in range(cfg.layers_per_block + 1):
            h = _resblock(cfg, ch, f"resnets_{j}")(h)
        if self.up < len(cfg.block_out_channels) - 1:
            h = VAEUpsample(name="upsampler", **cfg.dtypes)(h)
        return spatial_boundary(h)


class Encoder(nn.Module):
    """Image `[B, H, W, in_channels]` -> moments `[B, H/f, W/f, 2 * latent_channels]` (before quant_conv)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, self.cfg.dtypes
        h = conv(cfg.block_out_channels[0], name="conv_in", **kw)(x.astype(kw["dtype"]))
        for i in range(len(cfg.block_out_channels)):
            h = DownEncoderBlock(cfg, i, name=f"down_blocks_{i}")(h)
        h = MidBlock(cfg, name="mid_block")(h)
        h = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(2 * cfg.latent_channels, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latent `[B, h, w, latent_channels]` (after post_quant_conv) -> image `[B, f*h, f*w, out_channels]`."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, self.cfg.dtypes
        h = conv(cfg.block_out_channels[-1], name="conv_in", **kw)(z.astype(kw["dtype"]))
        h = MidBlock(cfg, name="mid_block")(h)
        for u in range(len(cfg.block_out_channels)):
            h = UpDecoderBlock(cfg, u, name=f"up_blocks_{u}")(h)
        h = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(cfg.out_channels, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Call a method through `apply`:

        vae = AutoencoderKL(cfg)
        dist = vae.apply({"params": p}, images, method=AutoencoderKL.encode)   # DiagonalGaussian
        images = vae.apply({"params": p}, dist.mode(), method=AutoencoderKL.decode)

    `__call__` (encode -> sample or mode -> decode) exists for `init`.
    """

    cfg: VAEConfig

    def setup(self):
        kw = self.cfg.dtypes
        latent = self.cfg.latent_channels
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        self.quant_conv = conv(2 * latent, kernel=1, **kw) if self.cfg.use_quant_conv else None
        self.post_quant_conv = conv(latent, kernel=1, **kw) if self.cfg.use_post_quant_conv else None

    def moments(self, x: jax.Array) -> jax.Array:
        """x: `[B, H, W, in_channels]` in [-1, 1], H and W multiples of `cfg.downsample_factor`
        -> fp32 `[B, H/f, W/f, 2 * latent_channels]` (mean channels, then unclamped logvar)."""
        check_images(x, self.cfg.in_channels, self.cfg.downsample_factor)
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.astype(jnp.float32)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: `[B, H, W, in_channels]` in [-1, 1] -> the posterior over `[B, H/f, W/f, latent_channels]`."""
        return DiagonalGaussian.from_moments(self.moments(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """z: unscaled latent `[B, h, w, latent_channels]` -> fp32 image `[B, f*h, f*w, out_channels]`
        (nominally in [-1, 1]; not clipped)."""
        cfg = self.cfg
        check_latents(z, cfg.latent_channels)
        z = z.astype(jnp.dtype(cfg.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction of x: decode a posterior sample (`key` given) or its mode."""
        dist = self.encode(x)
        return self.decode(dist.mode() if key is None else dist.sample(key))


def abstract_params(cfg: VAEConfig, batch: int = 1):
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s (nothing is allocated);
    cached (`config.abstract_params_of`): read-only."""
    return abstract_params_of(_trace_params, cfg, batch)


def _trace_params(cfg: VAEConfig, batch: int = 1):
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s; nothing is allocated."""
    f = cfg.downsample_factor
    x = jnp.zeros((batch, f, f, cfg.in_channels))
    return jax.eval_shape(lambda: AutoencoderKL(cfg).init(jax.random.key(0), x)["params"])


def vae_param_count(cfg: VAEConfig) -> int:
    """Exact parameter count from `jax.eval_shape`."""
    return param_count(abstract_params(cfg))
