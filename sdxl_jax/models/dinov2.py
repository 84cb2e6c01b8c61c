"""DINOv2 (ViT-S/14 ... ViT-L/14, no registers) as one Linen module: the frozen feature network of the
adversarial diffusion distillation discriminator.

Layout (transformers' `Dinov2Model` names, which the converter maps 1:1): embeddings (patch conv, CLS
token, mask token, learned position table for `image_size`, resampled to other grids) -> `num_layers`
pre-norm layers (LN -> self-attention -> layer scale, LN -> MLP -> layer scale, residuals) ->
final layernorm; `pooled` is the CLS token after it.

The position table is resampled exactly as transformers does it: PyTorch's bicubic (`F.interpolate`,
a = -0.75, align_corners=False, clamped borders, no antialiasing) from the trained grid to the input's,
in fp32. `jax.image.resize` is a different filter (a = -0.5, antialiased when shrinking), so the
resampling is written here as one interpolation matrix per axis.
"""

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models.attention import MLP, Attention
from sdxl_jax.models.config import ModelConfig, abstract_params_of, check_choice, check_positive
from sdxl_jax.models.layers import ACTIVATIONS, LayerNorm, conv, maybe_remat, param_count

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # transformers 5's names (4's are the converter's business)
TORCH_BICUBIC_A = -0.75  # the cubic-convolution parameter of PyTorch's bicubic (Keys' is -0.5)


@dataclasses.dataclass(frozen=True)
class Dinov2Config(ModelConfig):
    """Hyper-parameters of a DINOv2 ViT with the standard MLP (SwiGLU, i.e. ViT-g/14, is not supported)."""

    image_size: int = 518  # the side the position table was trained at: a (image_size // patch_size)² grid
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    mlp_ratio: int = 4  # MLP width = hidden_size * mlp_ratio
    activation: str = "gelu"  # a key of ACTIVATIONS; DINOv2's "gelu" is the exact (erf) one
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    layerscale_value: float = 1.0  # initial value of the layer-scale factors (trained ones are loaded)
    use_mask_token: bool = True  # the checkpoints carry `mask_token`; used only with `bool_masked_pos`
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    attention: str = "xla"  # a key of ATTENTION_IMPLS
    remat: str = "none"  # a key of REMAT_POLICIES

    def validate(self):
        sizes = ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads", "mlp_ratio")
        for field in sizes:
            check_positive(field, getattr(self, field))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_heads} heads")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than one {self.patch_size}-pixel patch")
        check_choice("activation", self.activation, ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * self.mlp_ratio

    @property
    def grid_size(self) -> int:
        """Patches per side of the trained position table."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the position table: the CLS token's, then the grid's in row-major order."""
        return self.grid_size**2 + 1

    @classmethod
    def vit_s14(cls, **overrides) -> "Dinov2Config":
        """`facebook/dinov2-small`, ADD's discriminator features: 22,056,576 parameters."""
        return cls(**overrides)

    @classmethod
    def vit_l14(cls, **overrides) -> "Dinov2Config":
        """`facebook/dinov2-large`, ADD's image conditioning (its CLS embedding): 304,368,640 parameters."""
        return cls(**(dict(hidden_size=1024, num_layers=24, num_heads=16) | overrides))

    @classmethod
    def tiny(cls, **overrides) -> "Dinov2Config":
        """A DINOv2-shaped ViT small enough for CPU tests: a 7x7 grid of 4-pixel patches."""
        return cls(**(dict(image_size=28, patch_size=4, hidden_size=32, num_layers=2, num_heads=4) | overrides))


class Dinov2Output(NamedTuple):
    """What `Dinov2Model` returns; B = batch, T = 1 + h * w tokens (CLS first), D = hidden_size."""

    hidden_states: tuple[jax.Array, ...]  # num_layers + 1 of `[B, T, D]`: embeddings, each layer (no final norm)
    last_hidden_state: jax.Array  # `[B, T, D]`: the last layer's output after the final layernorm
    pooled: jax.Array  # `[B, D]`: last_hidden_state's CLS token


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` fp32 matrix M with `M @ x` = PyTorch's 1-D bicubic resize of x to `out_size`
    (`F.interpolate(..., size=out_size, mode="bicubic", align_corners=False)`, no antialiasing).

    As PyTorch computes it (in fp32): scale = in / out; output i samples the input at
    s = scale * (i + 0.5) - 0.5, from the 4 taps floor(s) - 1 ... floor(s) + 2, each clamped into the
    input (so weights of taps beyond a border pile onto the border), weighted by the cubic-convolution
    kernel with a = -0.75 at distance s - tap.
    """
    f32, a = np.float32, np.float32(TORCH_BICUBIC_A)
    scale = f32(in_size) / f32(out_size)
    source = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    base = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    t = np.clip(source - base.astype(f32), f32(0), f32(1))
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |distance| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |distance| < 2
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # taps base-1 ... base+2
    taps = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), f32)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def resize_bicubic(grid: jax.Array, height: int, width: int) -> jax.Array:
    """`[h, w, C]` -> fp32 `[height, width, C]`, exactly PyTorch's 2-D bicubic (`torch_bicubic_matrix`
    along each axis; the filter is separable)."""
    rows = jnp.asarray(torch_bicubic_matrix(grid.shape[0], height))
    cols = jnp.asarray(torch_bicubic_matrix(grid.shape[1], width))
    highest = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on accelerators: this is the reference's fp32
    out = jnp.einsum("hi,ijc->hjc", rows, grid.astype(jnp.float32), precision=highest)
    return jnp.einsum("wj,hjc->hwc", cols, out, precision=highest)


class Dinov2PatchEmbeddings(nn.Module):
    """A `patch_size`-strided conv: pixels `[B, H, W, C]` -> `[B, H // p, W // p, D]` (remainder rows and
    columns dropped, as PyTorch's conv does)."""

    cfg: Dinov2Config

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        p = cfg.patch_size
        return conv(cfg.hidden_size, p, p, padding="VALID", name="projection", **cfg.dtypes)(pixels)


class Dinov2Embeddings(nn.Module):
    """[CLS; patches] + position table (resampled to the input's grid); masked patches -> `mask_token`."""

    cfg: Dinov2Config

    def positions(self, table: jax.Array, height: int, width: int) -> jax.Array:
        """The position rows for an `height x width` grid: table `[1, 1 + g*g, D]` -> `[1, 1 + height*width, D]`."""
        g = self.cfg.grid_size
        if (height, width) == (g, g):  # resampling at scale 1 is exactly the identity (weights 0, 1, 0, 0)
            return table
        grid = resize_bicubic(table[0, 1:].reshape(g, g, -1), height, width).astype(table.dtype)
        return jnp.concatenate([table[:, :1], grid.reshape(1, height * width, -1)], axis=1)

    @nn.compact
    def __call__(self, pixels: jax.Array, bool_masked_pos: jax.Array | None) -> jax.Array:
        """pixels `[B, H, W, C]`, bool_masked_pos `[B, (H // p) * (W // p)]` or None -> `[B, T, D]`."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        param = lambda name, init, shape, names: self.param(
            name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(cfg.param_dtype)
        )
        normal = nn.initializers.truncated_normal(0.02)
        cls_token = param("cls_token", normal, (1, 1, cfg.hidden_size), (None, None, "embed"))
        if cfg.use_mask_token:
            mask_token = param("mask_token", nn.initializers.zeros_init(), (1, cfg.hidden_size), (None, "embed"))
        table = param("position_embeddings", normal, (1, cfg.num_positions, cfg.hidden_size), (None, "length", "embed"))

        patches = Dinov2PatchEmbeddings(cfg, name="patch_embeddings")(pixels)
        b, h, w, d = patches.shape
        patches = patches.reshape(b, h * w, d)
        if bool_masked_pos is not None:
            patches = jnp.where(bool_masked_pos[..., None], mask_token.astype(dtype), patches)
        tokens = jnp.concatenate([jnp.broadcast_to(cls_token.astype(dtype), (b, 1, d)), patches], axis=1)
        return tokens + self.positions(table, h, w).astype(dtype)


class LayerScale(nn.Module):
    """Per-channel learned factors `lambda1` `[D]` (DINOv2's layer scale)."""

    init_value: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.constant(self.init_value), ("norm",))
        return x * self.param("lambda1", init, (x.shape[-1],), self.param_dtype).astype(self.dtype)


class Dinov2Layer(nn.Module):
    """Pre-norm layer: x + ls1(attn(LN1(x))), then + ls2(mlp(LN2(.)))."""

    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, T, D]` -> `[B, T, D]`."""
        cfg, kw = self.cfg, self.cfg.dtypes
        attn = Attention(cfg.num_heads, cfg.head_dim, cfg.attention, qkv_bias=cfg.qkv_bias, projections=PROJECTIONS,
                         name="attention", **kw)  # fmt: skip
        mlp = MLP(cfg.intermediate_size, cfg.activation, gated=False, projections=("fc1", "fc2"), name="mlp", **kw)
        scale = lambda name: LayerScale(cfg.layerscale_value, name=name, **kw)
        x = x + scale("layer_scale1")(attn(LayerNorm(cfg.layer_norm_eps, name="norm1", **kw)(x)))
        x = x + scale("layer_scale2")(mlp(LayerNorm(cfg.layer_norm_eps, name="norm2", **kw)(x)))
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class Dinov2Model(nn.Module):
    """`Dinov2Model(cfg).apply({"params": p}, pixels, bool_masked_pos=None)` -> `Dinov2Output`.

    pixels: float `[B, H, W, num_channels]`, normalised as the checkpoint expects (ImageNet mean/std
    for DINOv2), any H, W >= patch_size: the grid is (H // p, W // p), and the position table is
    resampled to it unless it is the trained grid. bool_masked_pos: bool `[B, grid cells]` or None;
    True replaces that patch's embedding by `mask_token` (DINOv2's pre-training input).
    Outputs are in the compute dtype.
    """

    cfg: Dinov2Config

    def _check_inputs(self, pixels: jax.Array, bool_masked_pos: jax.Array | None):
        cfg = self.cfg
        if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
            raise ValueError(f"pixels must be [B, H, W, {cfg.num_channels}], got {pixels.shape}")
        if min(pixels.shape[1:3]) < cfg.patch_size:
            raise ValueError(f"pixels {pixels.shape[1:3]} are smaller than one {cfg.patch_size}-pixel patch")
        if bool_masked_pos is None:
            return
        if not cfg.use_mask_token:
            raise ValueError("bool_masked_pos needs a mask token, and this config has use_mask_token=False")
        cells = (pixels.shape[1] // cfg.patch_size) * (pixels.shape[2] // cfg.patch_size)
        if bool_masked_pos.shape != (pixels.shape[0], cells) or bool_masked_pos.dtype != jnp.bool_:
            got = f"{bool_masked_pos.dtype} {bool_masked_pos.shape}"
            raise ValueError(f"bool_masked_pos must be a bool [{pixels.shape[0]}, {cells}] array, got {got}")

    @nn.compact
    def __call__(self, pixels: jax.Array, bool_masked_pos: jax.Array | None = None) -> Dinov2Output:
        cfg = self.cfg
        pixels = jnp.asarray(pixels)
        bool_masked_pos = None if bool_masked_pos is None else jnp.asarray(bool_masked_pos)
        self._check_inputs(pixels, bool_masked_pos)

        h = Dinov2Embeddings(cfg, name="embeddings")(pixels, bool_masked_pos)
        hidden_states = [h]
        layer_cls = maybe_remat(Dinov2Layer, cfg.remat)
        for i in range(cfg.num_layers):
            h = layer_cls(cfg, name=f"layers_{i}")(h)
            hidden_states.append(h)
        last = LayerNorm(cfg.layer_norm_eps, name="layernorm", **cfg.dtypes)(h)
        return Dinov2Output(tuple(hidden_states), last, last[:, 0])


def abstract_params(cfg: Dinov2Config):
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s (nothing is allocated);
    cached (`config.abstract_params_of`): read-only."""
    return abstract_params_of(_trace_params, cfg)


def _trace_params(cfg: Dinov2Config):
    pixels = jnp.zeros((1, cfg.patch_size, cfg.patch_size, cfg.num_channels))
    return jax.eval_shape(lambda: Dinov2Model(cfg).init(jax.random.key(0), pixels)["params"])


def dinov2_param_count(cfg: Dinov2Config) -> int:
    """Exact parameter count from `jax.eval_shape`."""
    return param_count(abstract_params(cfg))
