"""The discriminator of adversarial diffusion distillation (ADD §3.2): lightweight trainable heads on the
hidden states of a frozen feature network (DINOv2), StyleGAN-T's projected discriminator.

One head per feature map `[B, N, C]` (the tokens of one hidden state; `readout` prepares them):

  block = SpectralConv1d -> LocalBatchNorm -> LeakyReLU(0.2)
  h = block(kernel 1)(x);  h = (block(kernel 9)(h) + h) / sqrt(2)        [B, N, C]
  out = SpectralConv1d(kernel 1, C -> c_dim)(h)                           [B, N, c_dim]
  cmap = cmapper(concat[text_embed, image_embed])                          [B, c_dim]
  logits = sum_c(out * cmap) / sqrt(c_dim)                                 [B, N]: one logit per token

- SpectralConv1d: a 1-D convolution over the token axis with circular padding (kernel // 2 each side),
  its kernel divided by the largest singular value estimated as torch's `spectral_norm` does
  (`n_power_iterations=1`, `dim=0`, eps 1e-12): the kernel is read as the matrix W `[out, in * k]` of
  torch's `[out, in, k]` weight; with `train=True` each call runs one power iteration
  v = normalise(W^T u), u = normalise(W v) from the stored `u` (the new u, v are stored when the
  `spectral` collection is mutable) and divides by sigma = u . W v (u, v held constant for the
  gradient). With `train=False` sigma comes from the stored u, v, which stay as they are. `u` `[out]`
  and `v` `[in * k]` are torch's `weight_u`, `weight_v`, drawn normal and normalised at init.
- LocalBatchNorm: StyleGAN-T's `BatchNormLocal` (virtual batch 8): the batch of B splits into
  G = ceil(B / group_size) contiguous groups of B / G examples (B must divide into them: 16 -> 2 x 8,
  12 -> 2 x 6, 4 -> 1 x 4); each group is normalised with its own per-channel mean and biased variance
  over (its examples, tokens), eps 1e-5, then an affine scale and bias. No running statistics: training
  and evaluation compute the same thing.
- Conditioning is projection (Miyato & Koyama): the text embedding and, when given, the image embedding
  are concatenated (zeros stand for a missing image embedding: the layout dg845's ADD script uses,
  zeroing it at the pure-noise step) and mapped by one linear layer, StyleGAN-T's `FullyConnectedLayer`
  (kernel N(0, 1) scaled by 1 / sqrt(fan_in) at run time, bias 0), to `c_dim` = 64. Each head has its
  own. With no conditioning (both widths 0) the output conv has one channel, which is the logit.

Every head's weights are its own; the heads share nothing but the conditioning inputs:

    logits, state = ProjectedDiscriminator(cfg).apply(
        {"params": p, "spectral": s}, features, text_embed, image_embed, train=True, mutable=["spectral"])

torch iterates once per training-mode forward, so a discriminator step that scores fakes and then
reals iterates twice: pass the `spectral` state one call returns to the next to do the same.

Initialisation is torch's default for the convs (kernel and bias U(+-1/sqrt(fan_in))) and BatchNorm's
(scale 1, bias 0).
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.config import ModelConfig, abstract_params_of, check_positive
from sdxl_jax.models.dinov2 import Dinov2Config
from sdxl_jax.models.layers import Dtype, norm_affine, param_count, standardize
from sdxl_jax.models.patchgan import torch_conv_bias_init

SPECTRAL = "spectral"  # the collection of the power-iteration vectors u, v
HOOKED_LAYERS = 4  # StyleGAN-T hooks four evenly spaced transformer layers (and the embeddings)


def dinov2_hidden_states(cfg: Dinov2Config) -> tuple[int, ...]:
    """The `Dinov2Output.hidden_states` indices StyleGAN-T hooks: the embeddings (its `pos_drop` hook)
    and the output of every (num_layers / 4)-th layer, the last included, before the final layernorm
    (ViT-S/14: 0, 3, 6, 9, 12, i.e. blocks 2, 5, 8, 11 counted from 0)."""
    if cfg.num_layers % HOOKED_LAYERS:
        raise ValueError(f"{cfg.num_layers} DINOv2 layers do not split into {HOOKED_LAYERS} evenly spaced hooks")
    return tuple(range(0, cfg.num_layers + 1, cfg.num_layers // HOOKED_LAYERS))


def dinov2_feature_channels(cfg: Dinov2Config) -> tuple[int, ...]:
    """`ProjectedDiscriminatorConfig.feature_channels` for heads on `cfg`'s hooked hidden states."""
    return (cfg.hidden_size,) * len(dinov2_hidden_states(cfg))


@dataclasses.dataclass(frozen=True)
class ProjectedDiscriminatorConfig(ModelConfig):
    """Hyper-parameters of the heads. The defaults are ADD-XL's as far as published (ADD.md): one head per
    hooked hidden state of DINOv2 ViT-S/14, conditioned on CLIP ViT-bigG's pooled text embedding (its
    projection) and DINOv2 ViT-L/14's CLS embedding of the real image; 8,245,120 parameters."""

    feature_channels: tuple[int, ...] = dinov2_feature_channels(Dinov2Config.vit_s14())  # C of each head's input
    c_dim: int = 64  # width of the projection conditioning (StyleGAN-T's cmap_dim)
    text_embed_dim: int = CLIPTextConfig.openclip_vit_bigg14().projection_dim  # 0: no text conditioning
    image_embed_dim: int = Dinov2Config.vit_l14().hidden_size  # 0: no image conditioning
    kernel_size: int = 9  # the residual block's conv (odd: circular padding kernel // 2 each side)
    group_size: int = 8  # LocalBatchNorm's virtual batch
    negative_slope: float = 0.2
    norm_eps: float = 1e-5
    spectral_eps: float = 1e-12  # torch spectral_norm's normalisation floor
    dtype: str = "float32"  # compute; norm statistics and the spectral estimate are at least fp32
    param_dtype: str = "float32"

    def validate(self):
        if not self.feature_channels:
            raise ValueError("feature_channels must name at least one head")
        for k, c in enumerate(self.feature_channels):
            check_positive(f"feature_channels[{k}]", c)
        for field in ("c_dim", "kernel_size", "group_size", "norm_eps", "spectral_eps"):
            check_positive(field, getattr(self, field))
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.text_embed_dim < 0 or self.image_embed_dim < 0:
            raise ValueError("text_embed_dim and image_embed_dim must be >= 0")

    @property
    def num_heads(self) -> int:
        return len(self.feature_channels)

    @property
    def cond_dim(self) -> int:
        """Width of the concatenated conditioning [text, image]; 0: unconditional heads."""
        return self.text_embed_dim + self.image_embed_dim

    @classmethod
    def tiny(cls, **overrides) -> "ProjectedDiscriminatorConfig":
        """Two small heads for tests."""
        base = dict(feature_channels=(8, 12), c_dim=4, text_embed_dim=6, image_embed_dim=5, kernel_size=3)
        return cls(**(base | overrides))


def readout(hidden_state: jax.Array) -> jax.Array:
    """StyleGAN-T's `AddReadout`: `[B, 1 + N, C]` (CLS first) -> `[B, N, C]`, the CLS token added to
    every patch token and dropped."""
    return hidden_state[:, 1:] + hidden_state[:, :1]


def head_features(hidden_states: Sequence[jax.Array], cfg: Dinov2Config) -> list[jax.Array]:
    """The heads' inputs from the hidden states of a DINOv2 model of `cfg` (`Dinov2Output.hidden_states`:
    the embeddings and every layer's output)."""
    if (n := len(hidden_states)) != cfg.num_layers + 1:
        raise ValueError(f"a {cfg.num_layers}-layer DINOv2 has {cfg.num_layers + 1} hidden states, got {n}")
    return [readout(hidden_states[i]) for i in dinov2_hidden_states(cfg)]


def group_count(batch: int, group_size: int) -> int:
    """LocalBatchNorm's number of groups: ceil(batch / group_size), each of batch / groups examples."""
    groups = -(-batch // group_size)
    if batch % groups:
        raise ValueError(
            f"a batch of {batch} does not split into {groups} equal groups of at most {group_size} examples"
        )
    return groups


def _normalise(x: jax.Array, eps: float) -> jax.Array:
    """torch's `F.normalize`: x / max(|x|, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SpectralConv1d(nn.Module):
    """`[B, N, C_in]` -> `[B, N, features]`: a circularly padded 1-D convolution whose kernel is divided
    by its spectral-norm estimate (see the module docstring). Parameters `kernel` `[k, C_in, features]`,
    `bias`; `spectral` variables `u` `[features]`, `v` `[C_in * k]` (torch's layout)."""

    features: int
    kernel_size: int
    eps: float
    dtype: Dtype
    param_dtype: Dtype

    def matrix(self, kernel: jax.Array) -> jax.Array:
        """The kernel as torch's spectral_norm reads it: `[out, in * k]` of the `[out, in, k]` weight."""
        return jnp.transpose(kernel, (2, 1, 0)).reshape(self.features, -1)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        fan_in = c_in * k
        kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(kernel_init, ("conv_width", "conv_in", "conv_out")),
            (k, c_in, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(torch_conv_bias_init(fan_in), ("conv_out",)),
            (self.features,),
            self.param_dtype,
        )
        stat = jnp.promote_types(jnp.float32, self.param_dtype)
        draw = lambda n: _normalise(jax.random.normal(self.make_rng("params"), (n,), stat), self.eps)
        u = self.variable(SPECTRAL, "u", draw, self.features)
        v = self.variable(SPECTRAL, "v", draw, fan_in)

        w = self.matrix(kernel.astype(stat))
        dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)  # a few vectors: keep them exact
        u_now, v_now = u.value, v.value
        if train and not self.is_initializing():
            w_const = jax.lax.stop_gradient(w)
            v_now = _normalise(dot(u_now, w_const), self.eps)
            u_now = _normalise(dot(w_const, v_now), self.eps)
            u.value, v.value = u_now, v_now
        sigma = dot(u_now, dot(w, v_now))

        pad = k // 2
        x = x.astype(self.dtype)
        if pad:
            x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="wrap")
        y = jax.lax.conv_general_dilated(
            x,
            (kernel.astype(stat) / sigma).astype(self.dtype),
            window_strides=(1,),
            padding="VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + bias.astype(self.dtype)


class LocalBatchNorm(nn.Module):
    """StyleGAN-T's `BatchNormLocal` over `[B, N, C]` (see the module docstring); statistics in at least
    fp32. Parameters `scale`, `bias` `[C]`."""

    group_size: int
    epsilon: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        stat = jnp.promote_types(jnp.float32, x.dtype)
        scale, bias = norm_affine(self, c, stat)
        groups = group_count(b, self.group_size)
        g = x.astype(stat).reshape(groups, b // groups, *x.shape[1:])
        y = standardize(g, (1, 2), self.epsilon).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


class ConditionMapper(nn.Module):
    """StyleGAN-T's `FullyConnectedLayer` (linear): `[B, D]` -> `[B, features]`, kernel N(0, 1) used as
    kernel / sqrt(D), bias 0."""

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, c: jax.Array) -> jax.Array:
        d = c.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vector", None)),
            (d, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            (self.features,),
            self.param_dtype,
        )
        gain = 1 / math.sqrt(d)
        y = jnp.dot(c.astype(self.dtype), kernel.astype(self.dtype) * gain)
        return y + bias.astype(self.dtype)


class DiscriminatorHead(nn.Module):
    """One head: features `[B, N, C]`, conditioning `[B, cond_dim]` or None -> logits `[B, N]` (fp32, or
    the compute dtype if wider)."""

    cfg: ProjectedDiscriminatorConfig

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None, train: bool) -> jax.Array:
        cfg, kw = self.cfg, self.cfg.dtypes
        c = x.shape[-1]

        def block(k: int, kernel_size: int, h: jax.Array) -> jax.Array:
            h = SpectralConv1d(c, kernel_size, cfg.spectral_eps, name=f"conv_{k}", **kw)(h, train)
            h = LocalBatchNorm(cfg.group_size, cfg.norm_eps, name=f"norm_{k}", **kw)(h)
            return nn.leaky_relu(h, cfg.negative_slope)

        h = block(0, 1, x)
        h = (block(1, cfg.kernel_size, h) + h) * (1 / math.sqrt(2))
        out = SpectralConv1d(cfg.c_dim if cond is not None else 1, 1, cfg.spectral_eps, name="cls", **kw)(h, train)
        logit_dtype = jnp.promote_types(jnp.float32, kw["dtype"])
        out = out.astype(logit_dtype)
        if cond is None:
            return out[..., 0]
        cmap = ConditionMapper(cfg.c_dim, name="cmapper", **kw)(cond).astype(logit_dtype)
        return (out * cmap[:, None, :]).sum(-1) * (1 / math.sqrt(cfg.c_dim))


class ProjectedDiscriminator(nn.Module):
    """Head inputs (a sequence of `num_heads` arrays `[B, N_k, feature_channels[k]]`), `text_embed`
    `[B, text_embed_dim]` (None only when that is 0), `image_embed` `[B, image_embed_dim]` or None
    (zeros) -> a tuple of logits `[B, N_k]` (fp32, or the compute dtype if wider), one per head.
    `train` runs the spectral-norm power iteration (store it with `mutable=["spectral"]`); the forward
    is otherwise the same in both modes."""

    cfg: ProjectedDiscriminatorConfig

    def conditioning(self, batch: int, text_embed, image_embed) -> jax.Array | None:
        cfg = self.cfg
        if cfg.cond_dim == 0:
            if text_embed is not None or image_embed is not None:
                raise ValueError("this discriminator is unconditional (text_embed_dim = image_embed_dim = 0)")
            return None
        parts = []
        for name, width, value in (
            ("text", cfg.text_embed_dim, text_embed),
            ("image", cfg.image_embed_dim, image_embed),
        ):
            if width == 0:
                if value is not None:
                    raise ValueError(f"{name}_embed given, but {name}_embed_dim is 0")
                continue
            if value is None:
                if name == "text":
                    raise ValueError("text_embed is required (text_embed_dim > 0)")
                value = jnp.zeros((batch, width), jnp.float32)
            if value.shape != (batch, width):
                raise ValueError(f"{name}_embed must be [{batch}, {width}], got shape {value.shape}")
            parts.append(value.astype(jnp.float32))
        return jnp.concatenate(parts, axis=-1)

    @nn.compact
    def __call__(
        self,
        features: Sequence[jax.Array],
        text_embed: jax.Array | None,
        image_embed: jax.Array | None = None,
        *,
        train: bool,
    ) -> tuple[jax.Array, ...]:
        cfg = self.cfg
        if len(features) != cfg.num_heads:
            raise ValueError(f"expected {cfg.num_heads} feature maps, got {len(features)}")
        batch = features[0].shape[0]
        for k, (f, c) in enumerate(zip(features, cfg.feature_channels)):
            if f.ndim != 3 or f.shape[0] != batch or f.shape[-1] != c:
                raise ValueError(f"feature map {k} must be [{batch}, N, {c}], got shape {f.shape}")
        group_count(batch, cfg.group_size)
        cond = self.conditioning(batch, text_embed, image_embed)
        return tuple(DiscriminatorHead(cfg, name=f"head_{k}")(f, cond, train) for k, f in enumerate(features))


def _example_inputs(cfg: ProjectedDiscriminatorConfig, batch: int = 1, tokens: int = 1):
    features = [jnp.zeros((batch, tokens, c)) for c in cfg.feature_channels]
    text = jnp.zeros((batch, cfg.text_embed_dim)) if cfg.text_embed_dim else None
    image = jnp.zeros((batch, cfg.image_embed_dim)) if cfg.image_embed_dim else None
    return features, text, image


def abstract_variables(cfg: ProjectedDiscriminatorConfig):
    """`{"params": ..., "spectral": ...}` (params boxed) as `ShapeDtypeStruct`s; nothing is allocated.
    Cached (`config.abstract_params_of`): read-only. The spectral vectors are in at least fp32."""
    traced = abstract_params_of(_trace_variables, cfg)  # every leaf in param_dtype
    vector = lambda s: jax.ShapeDtypeStruct(s.shape, jnp.promote_types(jnp.float32, cfg.param_dtype))
    return {"params": traced["params"], SPECTRAL: jax.tree.map(vector, traced[SPECTRAL])}


def _trace_variables(cfg: ProjectedDiscriminatorConfig):
    features, text, image = _example_inputs(cfg)
    init = lambda: ProjectedDiscriminator(cfg).init(jax.random.key(0), features, text, image, train=False)
    return jax.eval_shape(init)


def discriminator_param_count(cfg: ProjectedDiscriminatorConfig) -> int:
    """Trainable parameters (not the spectral vectors), from `jax.eval_shape`."""
    return param_count(abstract_variables(cfg)["params"])
