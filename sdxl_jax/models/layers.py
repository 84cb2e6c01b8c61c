"""Building blocks of the UNet, the VAE and the text encoders: dense and conv layers, norms, the residual
block, down/upsampling, embeddings, remat policies and activations.

All tensors are channels-last: images `[B, H, W, C]`, sequences `[B, L, C]`. Every parameter is
annotated with logical axis names from `sdxl_jax.sharding.LOGICAL_AXES`, and block boundaries carry
activation names (`act_*`).
"""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.sharding import ACTIVATION_OF

Dtype = jnp.dtype

# MLP activations by name (transformers' `hidden_act`): OpenAI CLIP's sigmoid approximation, and the
# exact erf GELU (OpenCLIP's MLP, the UNet's GEGLU gate).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}

# Remat policies by name; `None` means no rematerialisation.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def maybe_remat(module_cls, policy_name: str):
    """`module_cls` wrapped in `nn.remat` with the named policy (unchanged for "none")."""
    if REMAT_POLICIES[policy_name] is None:
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy_name], prevent_cse=True)


class Dense(nn.Dense):
    """`nn.Dense` whose input and output are pinned to the activation names of its kernel's axes.

    x `[B, ..., in]` is constrained to ("act_batch", "act_length", ..., ACTIVATION_OF[names[0]]) and the
    result to (..., ACTIVATION_OF[names[1]]): with `activation_constraints` every matmul's operands and
    result carry an explicit sharding (heads/mlp split over `tensor`, the rest replicated there), so
    XLA's SPMD partitioner never picks the layout around a tensor-parallel weight itself. Left to
    choose, it miscompiles some of them: a dot with the batch over (data, fsdp), the contraction
    over `tensor` and the weight's output axis over `fsdp` gets its batch shards collective-permuted
    and never put back, i.e. other examples' results (jaxlib 0.10.2, Shardy or GSPMD; see
    tests/test_train_sharding.py). The constraints are no-ops unless rules and a mesh are in context.
    """

    names: tuple[str | None, str | None] = (None, None)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        middle = (("act_length",) + (None,) * (x.ndim - 3)) if x.ndim > 2 else ()
        x = nn.with_logical_constraint(x, ("act_batch", *middle, ACTIVATION_OF.get(self.names[0])))
        return nn.with_logical_constraint(super().__call__(x), ("act_batch", *middle, ACTIVATION_OF.get(self.names[1])))


def dense(features: int, names: tuple[str, str], *, use_bias=True, dtype, param_dtype, name=None):
    """`Dense` with kernel `[in, features]` annotated `names` and bias annotated `names[1]`."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        names=tuple(names),
        name=name,
    )


def conv_kernel_init():
    """The initialiser and logical axes of a conv kernel `[kh, kw, in, out]`."""
    return nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "conv_out")
    )


def conv_bias_init():
    """The initialiser and logical axis of a conv bias `[out]`."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def conv(features: int, kernel: int = 3, stride: int = 1, *, padding=None, dtype, param_dtype, name=None):
    """nn.Conv, kernel `[k, k, in, out]`; padding ((top, bottom), (left, right)), by default symmetric
    'same' padding (PyTorch's `padding=kernel // 2`)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=conv_kernel_init(),
        bias_init=conv_bias_init(),
        name=name,
    )


def spatial_boundary(h: jax.Array) -> jax.Array:
    """Pins an image-shaped activation `[B, H, W, C]` to its activation names (the end of a UNet/VAE block)."""
    return nn.with_logical_constraint(h, ("act_batch", "act_height", "act_width", "act_channels"))


def norm_affine(module: nn.Module, channels: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The per-channel `scale` (init 1) and `bias` (init 0) of a norm, as `dtype` `[C]`."""
    init = lambda fn: nn.with_logical_partitioning(fn, ("norm",))
    scale = module.param("scale", init(nn.initializers.ones_init()), (channels,), module.param_dtype)
    bias = module.param("bias", init(nn.initializers.zeros_init()), (channels,), module.param_dtype)
    return scale.astype(dtype), bias.astype(dtype)


def standardize(x32: jax.Array, axes: tuple[int, ...], epsilon: float) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` over `axes`, in x's (fp32 or wider) dtype, with torch's biased variance."""
    mean = x32.mean(axis=axes, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=axes, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + epsilon)


class GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis, statistics and affine in fp32, output in `dtype`.

    Matches `torch.nn.GroupNorm` (biased variance, eps inside the square root).
    """

    num_groups: int
    epsilon: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, ..., C]` -> same shape."""
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale, bias = norm_affine(self, c)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        reduce_axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # all spatial axes + channels in group
        normed = standardize(grouped, reduce_axes, self.epsilon).reshape(x.shape)
        return (normed * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in fp32, output in `dtype` (matches `torch.nn.LayerNorm`)."""

    epsilon: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[..., C]` -> same shape."""
        scale, bias = norm_affine(self, x.shape[-1])
        y = standardize(x.astype(jnp.float32), (-1,), self.epsilon)
        return (y * scale + bias).astype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding `cat[cos, sin]` of `t` `[B]` (float or int) -> fp32 `[B, dim]`.

    Frequencies `exp(-ln(max_period) * i / (dim // 2))`, the convention of sgm and of diffusers with
    `flip_sin_to_cos=True, freq_shift=0`. Used for the UNet timestep and for SDXL's micro-conditioning.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class EmbeddingMLP(nn.Module):
    """Linear -> SiLU -> Linear (the timestep embedding and SDXL's `add_embedding`)."""

    features: int
    in_axis: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, D_in]` -> `[B, features]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, (self.in_axis, "time_embed"), name="linear_1", **kw)(x.astype(self.dtype))
        x = dense(self.features, ("mlp", "time_embed"), name="linear_2", **kw)(nn.silu(x))
        return x


class ResBlock(nn.Module):
    """diffusers' ResnetBlock2D: GroupNorm -> SiLU -> conv3x3 (+ timestep projection) -> GroupNorm -> SiLU
    -> conv3x3, residual.

    The UNet passes a timestep embedding (projected by `time_emb_proj`); the VAE passes none and its
    blocks have no `time_emb_proj`. A 1x1 conv maps the skip path when the channel count changes.
    """

    out_channels: int
    norm_groups: int
    norm_eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: `[B, H, W, C_in]`, temb: `[B, D_t]` or None -> `[B, H, W, out_channels]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: GroupNorm(self.norm_groups, self.norm_eps, name=name, **kw)
        h = conv(self.out_channels, name="conv1", **kw)(nn.silu(norm("norm1")(x)))
        if temb is not None:
            t = dense(self.out_channels, ("time_embed", "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = conv(self.out_channels, name="conv2", **kw)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, kernel=1, name="conv_shortcut", **kw)(x)
        return x + h


class Downsample(nn.Module):
    """conv3x3 with stride 2: `[B, H, W, C]` -> `[B, H/2, W/2, C]` (H, W even).

    The UNet pads 1 on every side; the VAE (diffusers' Downsample2D with `padding=0`, which pads one
    row/column at the bottom/right only) passes `padding=((0, 1), (0, 1))`: a grid shifted by a pixel.
    """

    dtype: Dtype
    param_dtype: Dtype
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return conv(x.shape[-1], stride=2, padding=self.padding, name="conv", **kw)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3: `[B, H, W, C]` -> `[B, 2H, 2W, C]`."""

    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


def param_count(abstract_params) -> int:
    """The number of parameters in a (boxed) tree of arrays or `ShapeDtypeStruct`s."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(abstract_params)))
