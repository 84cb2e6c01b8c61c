"""The PatchGAN discriminator of CompVis' first-stage training (taming's `NLayerDiscriminator`, as ldm's
`LPIPSWithDiscriminator` builds it: BatchNorm, no ActNorm).

  conv4x4/2 (+bias) -> LeakyReLU(0.2)
  n = 1 .. n_layers - 1:  conv4x4/2 (no bias) -> BatchNorm -> LeakyReLU(0.2)
  conv4x4/1 (no bias) -> BatchNorm -> LeakyReLU(0.2)
  conv4x4/1 (+bias) -> 1 channel: a logit per overlapping patch
with padding 1 everywhere and widths `channels * min(2^n, max_mult)`.

BatchNorm is torch's `BatchNorm2d`: in training it normalises with the batch's statistics (biased
variance) and moves running averages, kept in the `batch_stats` collection, towards the batch's mean
and *unbiased* variance; in evaluation it normalises with the running averages:

    logits, updates = PatchDiscriminator(cfg).apply(
        {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
    logits = PatchDiscriminator(cfg).apply({"params": p, "batch_stats": updates["batch_stats"]}, x, train=False)

Under `jit` the statistics are those of the whole (global) batch, however it is sharded. taming calls
the discriminator on real and on reconstructed images separately, so each call has its own statistics
and moves the running averages once.

Initialisation is taming's `weights_init`: conv kernels N(0, 0.02), BatchNorm scales N(1, 0.02) and
biases 0; the two conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which
`weights_init` leaves alone. Module names (`conv_k`, `norm_k`) map to taming's `main.{index}` in
`sdxl_jax.convert.perceptual`.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.config import ModelConfig, check_positive
from sdxl_jax.models.layers import Dtype, param_count

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class PatchDiscriminatorConfig(ModelConfig):
    """Hyper-parameters of an `NLayerDiscriminator`; the defaults are taming's and ldm's (2,765,633
    parameters, logits at 1/8 of the input's size less 2)."""

    in_channels: int = 3
    channels: int = 64  # taming's ndf: the first conv's width
    n_layers: int = 3  # stride-2 convs; one stride-1 conv with BatchNorm and the output conv follow
    max_mult: int = 8  # widths stop growing at channels * max_mult
    negative_slope: float = 0.2
    norm_eps: float = 1e-5  # torch BatchNorm2d's
    norm_momentum: float = 0.1  # torch's convention: running = (1 - momentum) * running + momentum * batch
    init_std: float = 0.02  # taming's weights_init
    dtype: str = "float32"  # compute; BatchNorm statistics are fp32 regardless
    param_dtype: str = "float32"

    def validate(self):
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        for field in ("in_channels", "channels", "max_mult", "norm_eps", "init_std"):
            check_positive(field, getattr(self, field))
        if not 0 < self.norm_momentum <= 1:
            raise ValueError(f"norm_momentum must be in (0, 1], got {self.norm_momentum}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of conv_0 .. conv_{n_layers + 1} (the last is the 1-channel output)."""
        return tuple(self.channels * min(2**n, self.max_mult) for n in range(self.n_layers + 1)) + (1,)

    def logits_size(self, size: int) -> int:
        """Logit rows (or columns) for `size` input rows: halved `n_layers` times, then 2 less."""
        for _ in range(self.n_layers):
            size = (size + 2 - 4) // 2 + 1
        return size - 2

    @property
    def min_size(self) -> int:
        """The smallest input side with at least one logit."""
        return 3 * 2**self.n_layers


def normal_init(mean: float, std: float):
    return lambda key, shape, dtype: mean + std * jax.random.normal(key, shape, dtype)


def torch_conv_bias_init(fan_in: int):
    """PyTorch's default conv bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class BatchNorm(nn.Module):
    """torch's `BatchNorm2d` over the last axis (see the module docstring); statistics in fp32.

    Parameters `scale`, `bias`; `batch_stats` `mean`, `var` (the running averages, fp32).
    """

    epsilon: float
    momentum: float  # torch's convention (flax's BatchNorm momentum is 1 - this)
    init_std: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: `[B, H, W, C]` -> same shape, in `dtype`."""
        c = x.shape[-1]
        norm = lambda init: nn.with_logical_partitioning(init, ("norm",))
        scale = self.param("scale", norm(normal_init(1.0, self.init_std)), (c,), self.param_dtype)
        bias = self.param("bias", norm(nn.initializers.zeros_init()), (c,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            axes, n = tuple(range(x.ndim - 1)), x.size // c
            if n < 2:
                raise ValueError(f"BatchNorm in training needs more than one value per channel, got shape {x.shape}")
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * (n / (n - 1))
        else:
            mean, var = running_mean.value, running_var.value
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class PatchDiscriminator(nn.Module):
    """Images `[B, H, W, in_channels]` in [-1, 1] -> fp32 patch logits `[B, h, w, 1]`
    (h = `cfg.logits_size(H)`). `train` picks batch statistics (and moving the running averages, with
    `mutable=["batch_stats"]`) or the running averages."""

    cfg: PatchDiscriminatorConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg, kw = self.cfg, self.cfg.dtypes
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"images must be [B, H, W, {cfg.in_channels}] (NHWC), got shape {x.shape}")
        if min(x.shape[1:3]) < cfg.min_size:
            raise ValueError(f"images must be at least {cfg.min_size}x{cfg.min_size}, got {x.shape[1]}x{x.shape[2]}")

        def conv(k: int, stride: int, use_bias: bool, h: jax.Array) -> jax.Array:
            fan_in = h.shape[-1] * 4 * 4
            return nn.Conv(
                cfg.widths[k], (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
                kernel_init=nn.with_logical_partitioning(normal_init(0.0, cfg.init_std), CONV_AXES),
                bias_init=nn.with_logical_partitioning(torch_conv_bias_init(fan_in), ("conv_out",)),
                name=f"conv_{k}", **kw,
            )(h)  # fmt: skip

        act = lambda h: nn.leaky_relu(h, cfg.negative_slope)
        h = act(conv(0, 2, True, x.astype(kw["dtype"])))
        for k in range(1, cfg.n_layers + 1):
            h = conv(k, 2 if k < cfg.n_layers else 1, False, h)
            norm = BatchNorm(cfg.norm_eps, cfg.norm_momentum, cfg.init_std, name=f"norm_{k}", **kw)
            h = act(norm(h, train))
        return conv(cfg.n_layers + 1, 1, True, h).astype(jnp.float32)


@functools.cache
def abstract_variables(cfg: PatchDiscriminatorConfig):
    """`{"params": ..., "batch_stats": ...}` (boxed) as `ShapeDtypeStruct`s; nothing is allocated. Cached:
    read-only."""
    x = jnp.zeros((1, cfg.min_size, cfg.min_size, cfg.in_channels))
    return jax.eval_shape(lambda: PatchDiscriminator(cfg).init(jax.random.key(0), x, train=False))


def discriminator_param_count(cfg: PatchDiscriminatorConfig) -> int:
    """Trainable parameters (not the running averages), from `jax.eval_shape`."""
    return param_count(abstract_variables(cfg)["params"])
