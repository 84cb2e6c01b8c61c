"""The SDXL UNet (and its SD 1.x/2.x relatives) as one Linen module configured by `UNetConfig`.

Layout (diffusers' names, which the converters map 1:1): conv_in -> down_blocks_i (resnets_j,
attentions_j, downsampler) -> mid_block -> up_blocks_i (resnets_j, attentions_j, upsampler) ->
conv_norm_out -> conv_out, with the timestep embedding (+ the vector conditioning `y`) fed to every
resnet and the text context to every transformer.

`UNet.encode_features` runs the encoder alone (conv_in, the down blocks, the middle block) and returns
its hidden states by name (`feature_names`: each named after the block that computes it), for a
discriminator built on a frozen UNet (`unet_features.py`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.attention import SpatialTransformer
from sdxl_jax.models.config import ModelConfig, abstract_params_of, check_norm_groups
from sdxl_jax.models.layers import (
    Downsample,
    EmbeddingMLP,
    GroupNorm,
    ResBlock,
    Upsample,
    conv,
    maybe_remat,
    param_count,
    spatial_boundary,
    timestep_embedding,
)


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """Hyper-parameters of a UNet; levels are indexed from the full-resolution one (level 0)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 10
    head_dim: int | None = 64  # exactly one of head_dim (width per head) and num_heads is set
    num_heads: int | None = None
    context_dim: int = 2048
    adm_in_channels: int | None = 2816  # width of the vector conditioning y; None = no y
    # sinusoid width per micro-conditioning scalar inside y (diffusers' addition_time_embed_dim)
    time_id_embed_dim: int = 256
    use_linear_projection: bool = True  # checkpoint layout of proj_in/out: Linear (True) or 1x1 conv
    norm_groups: int = 32
    norm_eps: float = 1e-5  # resnets and the output norm
    transformer_norm_eps: float = 1e-6  # the GroupNorm that opens each spatial transformer
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    attention: str = "xla"  # a key of ATTENTION_IMPLS
    remat: str = "none"  # a key of REMAT_POLICIES
    scan_layers: bool = False  # nn.scan over each transformer's stacked blocks

    def validate(self):
        levels = len(self.channel_mult)
        if len(self.transformer_depth) != levels:
            raise ValueError(f"transformer_depth {self.transformer_depth} needs one entry per level ({levels})")
        if (self.head_dim is None) == (self.num_heads is None):
            raise ValueError("set exactly one of head_dim and num_heads")
        check_norm_groups(self.level_channels, self.norm_groups)
        for ch in self.level_channels:
            if ch % (self.head_dim or self.num_heads):
                raise ValueError(f"{ch} channels do not split into heads ({self.head_dim=}, {self.num_heads=})")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        """Total spatial downsampling; latent H and W must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of a transformer with `channels` channels."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

    @classmethod
    def sdxl_base(cls, **overrides) -> "UNetConfig":
        """SDXL 1.0 base: 2,567,463,684 parameters."""
        return cls(**overrides)

    @classmethod
    def sdxl_refiner(cls, **overrides) -> "UNetConfig":
        """SDXL 1.0 refiner: 2,259,526,660 parameters."""
        fields = dict(
            model_channels=384,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=(0, 4, 4, 0),
            transformer_depth_middle=4,
            context_dim=1280,
            adm_in_channels=2560,
        )
        return cls(**(fields | overrides))

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        """An SDXL-shaped UNet small enough for CPU tests (3 levels, depths 0/2/3, deep middle)."""
        fields = dict(
            model_channels=32,
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 3),
            transformer_depth_middle=3,
            head_dim=16,
            context_dim=48,
            adm_in_channels=40,  # 16 pooled + 6 scalars x 4
            time_id_embed_dim=4,
            norm_groups=8,
        )
        return cls(**(fields | overrides))


def feature_names(cfg: UNetConfig) -> tuple[str, ...]:
    """The encoder features `UNet.encode_features` returns, from full resolution down to the middle
    block, each named after the block that computes it (and holds its parameters): "down_blocks_{i}"
    per level, then "mid_block"."""
    return tuple(f"down_blocks_{i}" for i in range(len(cfg.channel_mult))) + ("mid_block",)


def check_latent_size(cfg: UNetConfig, height: int, width: int) -> None:
    """Raise unless a latent of `height` x `width` goes through every downsampler evenly."""
    f = cfg.downsample_factor
    if height % f or width % f:
        raise ValueError(f"latent size {height}x{width} is not a multiple of the UNet's downsampling factor {f}")


def _resblock(cfg: UNetConfig, channels: int, name: str) -> nn.Module:
    return maybe_remat(ResBlock, cfg.remat)(channels, cfg.norm_groups, cfg.norm_eps, name=name, **cfg.dtypes)


def _transformer(cfg: UNetConfig, channels: int, depth: int, name: str) -> nn.Module:
    heads, head_dim = cfg.heads(channels)
    return SpatialTransformer(
        depth, heads, head_dim, cfg.norm_groups, cfg.transformer_norm_eps, cfg.layer_norm_eps, cfg.attention,
        cfg.remat, cfg.scan_layers, name=name, **cfg.dtypes,
    )  # fmt: skip


class DownBlock(nn.Module):
    """One encoder level: `num_res_blocks` x (resnet [+ transformer]), then a stride-2 conv unless last."""

    cfg: UNetConfig
    level: int

    @nn.compact
    def __call__(self, h, temb, context) -> tuple[jax.Array, list[jax.Array]]:
        """h: `[B, H, W, C_in]` -> (`[B, H', W', C]`, the skip activations in order)."""
        cfg, ch, depth = self.cfg, self.cfg.level_channels[self.level], self.cfg.transformer_depth[self.level]
        skips = []
        for j in range(cfg.num_res_blocks):
            h = _resblock(cfg, ch, f"resnets_{j}")(h, temb)
            if depth:
                h = _transformer(cfg, ch, depth, f"attentions_{j}")(h, context)
            skips.append(h)
        if self.level < len(cfg.channel_mult) - 1:
            h = Downsample(name="downsampler", **cfg.dtypes)(h)
            skips.append(h)
        return spatial_boundary(h), skips


class MidBlock(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, h, temb, context) -> jax.Array:
        cfg, ch = self.cfg, self.cfg.level_channels[-1]
        h = _resblock(cfg, ch, "resnets_0")(h, temb)
        h = _transformer(cfg, ch, cfg.transformer_depth_middle, "attentions_0")(h, context)
        return spatial_boundary(_resblock(cfg, ch, "resnets_1")(h, temb))


class UpBlock(nn.Module):
    """One decoder level: `num_res_blocks + 1` x (concat skip, resnet [+ transformer]), then x2 upsample
    unless it is the full-resolution level."""

    cfg: UNetConfig
    level: int

    @nn.compact
    def __call__(self, h, skips: list[jax.Array], temb, context) -> jax.Array:
        """h: `[B, H, W, C']`, skips: this level's `num_res_blocks + 1` encoder activations, in encoder
        order (consumed last first) -> `[B, 2H, 2W, C]`."""
        cfg, ch, depth = self.cfg, self.cfg.level_channels[self.level], self.cfg.transformer_depth[self.level]
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)
            h = _resblock(cfg, ch, f"resnets_{j}")(h, temb)
            if depth:
                h = _transformer(cfg, ch, depth, f"attentions_{j}")(h, context)
        if self.level > 0:
            h = Upsample(name="upsampler", **cfg.dtypes)(h)
        return spatial_boundary(h)


class UNet(nn.Module):
    """`UNet(cfg).apply({"params": p}, x, timesteps, context, y)` -> predicted noise (or v).

    x: `[B, H, W, in_channels]` (H, W multiples of `cfg.downsample_factor`); timesteps: `[B]` float or
    int; context: `[B, L, context_dim]`; y: `[B, adm_in_channels]` or None -> `[B, H, W, out_channels]`
    in the compute dtype.
    """

    cfg: UNetConfig

    def _check_inputs(self, x, timesteps, context, y):
        cfg = self.cfg
        b, h, w, c = x.shape
        check_latent_size(cfg, h, w)
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels, the UNet expects {cfg.in_channels}")
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps shape {timesteps.shape} != ({b},)")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context shape {context.shape} != ({b}, L, {cfg.context_dim})")
        if (y is None) != (cfg.adm_in_channels is None):
            raise ValueError(f"y must be given iff adm_in_channels is set (adm_in_channels={cfg.adm_in_channels})")
        if y is not None and y.shape != (b, cfg.adm_in_channels):
            raise ValueError(f"y shape {y.shape} != ({b}, {cfg.adm_in_channels})")

    def __call__(self, x, timesteps, context, y=None) -> jax.Array:
        out, _ = self._forward(x, timesteps, context, y, decode=True)
        return out

    def encode_features(self, x, timesteps, context, y=None) -> dict[str, jax.Array]:
        """The encoder's hidden states, without running the decoder (same inputs as `__call__`):

            UNet(cfg).apply({"params": p}, x, timesteps, context, y, method="encode_features")

        -> {"down_blocks_{i}": `[B, H / 2^i, W / 2^i, level_channels[i]]` for every level i,
            "mid_block": `[B, H / 2^(L-1), W / 2^(L-1), level_channels[-1]]`} in the compute dtype,
        keyed by `feature_names(cfg)`.

        A level's feature is its last resnet/transformer output, taken *before* its downsampler: the
        level's full computation at its own resolution and width (the last skip the decoder reads at
        that level). After the downsampler it would only be a strided conv of the same thing, which is
        the next level's input, at half the resolution. The last level has no downsampler, so its feature
        is the block's output. Parameters are `__call__`'s (the decoder's are simply not read); create
        them with `init`, not through this method.
        """
        _, features = self._forward(x, timesteps, context, y, decode=False)
        return features

    @nn.compact
    def _forward(self, x, timesteps, context, y, decode: bool):
        """-> (the output, or None without `decode`; the encoder features by name)."""
        cfg = self.cfg
        timesteps = jnp.asarray(timesteps)
        self._check_inputs(x, timesteps, context, y)
        kw = cfg.dtypes
        dtype = kw["dtype"]

        temb = timestep_embedding(timesteps, cfg.model_channels)
        temb = EmbeddingMLP(cfg.time_embed_dim, "time_in", name="time_embedding", **kw)(temb)
        if y is not None:
            temb = temb + EmbeddingMLP(cfg.time_embed_dim, "vector", name="add_embedding", **kw)(y)
        context = context.astype(dtype)

        h = conv(cfg.model_channels, name="conv_in", **kw)(x.astype(dtype))
        skips = [h]
        features = {}
        levels, names = len(cfg.channel_mult), feature_names(cfg)
        for i in range(levels):
            h, level_skips = DownBlock(cfg, i, name=names[i])(h, temb, context)
            features[names[i]] = level_skips[cfg.num_res_blocks - 1]  # before the downsampler
            skips += level_skips
        h = MidBlock(cfg, name=names[-1])(h, temb, context)
        features[names[-1]] = h
        if not decode:
            return None, features

        n = cfg.num_res_blocks + 1
        for u, level in enumerate(reversed(range(levels))):
            h = UpBlock(cfg, level, name=f"up_blocks_{u}")(h, skips[len(skips) - n :], temb, context)
            skips = skips[: len(skips) - n]

        h = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(cfg.out_channels, name="conv_out", **kw)(h), features


def unet_param_count(cfg: UNetConfig) -> int:
    """Exact parameter count from `jax.eval_shape` (nothing is allocated)."""
    return param_count(abstract_params(cfg))


def abstract_params(cfg: UNetConfig, batch: int = 1, latent: tuple[int, int] | None = None):
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s (nothing is allocated);
    cached (`config.abstract_params_of`): read-only."""
    return abstract_params_of(_trace_params, cfg, batch, latent)


def _trace_params(cfg: UNetConfig, batch: int = 1, latent: tuple[int, int] | None = None):
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s."""
    f = cfg.downsample_factor
    h, w = latent or (f, f)
    x = jnp.zeros((batch, h, w, cfg.in_channels))
    t = jnp.zeros((batch,))
    ctx = jnp.zeros((batch, 1, cfg.context_dim))
    y = None if cfg.adm_in_channels is None else jnp.zeros((batch, cfg.adm_in_channels))
    init = lambda: UNet(cfg).init(jax.random.key(0), x, t, ctx, y)["params"]
    return jax.eval_shape(init)
