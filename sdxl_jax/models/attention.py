"""Attention: one kernel entry point, one attention module, and the UNet's transformer blocks built on it.

Every attention in the project (the UNet's self/cross-attention, CLIP's causal self-attention, the
VAE's mid-block attention over pixels) is the `Attention` module, which goes through
`dot_product_attention`, whose implementation is chosen by name from `ATTENTION_IMPLS` ('xla'
everywhere, 'chunked' the same over blocks of queries (less memory, any platform), 'cudnn' flash
attention on NVIDIA GPUs, 'flash' the Pallas splash kernel on TPU and in
interpret mode elsewhere: `models.flash_attention`). Another kernel plugs in with `register_attention`.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.flash_attention import flash_attention
from sdxl_jax.models.layers import ACTIVATIONS, Dtype, GroupNorm, LayerNorm, dense, maybe_remat

# fn(q, k, v, is_causal) with q `[B, T, N, H]`, k/v `[B, S, N, H]` -> `[B, T, N, H]`,
# softmax in fp32, scale 1/sqrt(H).
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]


def xla_attention(q, k, v, causal: bool) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


QUERY_CHUNK = 1024


def chunked_attention(q, k, v, causal: bool, chunk: int = QUERY_CHUNK) -> jax.Array:
    """XLA attention over `chunk` queries at a time (a `lax.map`), so the scores held at once are
    `[B, N, chunk, S]` rather than `[B, N, T, S]`: exact (each query's softmax is its own), for
    platforms without a fused kernel. SDXL at 1024² has T = S = 4096 (UNet) and 16384 (VAE mid
    block) positions; their whole score matrices are the largest temporaries of the sampling program
    on CPU. Sequences of at most `chunk` queries, and causal ones (CLIP, 77 tokens), go unchunked."""
    b, t, n, h = q.shape
    if t <= chunk or causal:
        return xla_attention(q, k, v, causal)
    pieces = -(-t // chunk)
    q = jnp.pad(q, ((0, 0), (0, pieces * chunk - t), (0, 0), (0, 0)))  # padded queries are dropped after
    q = q.reshape(b, pieces, chunk, n, h).swapaxes(0, 1)  # [pieces, B, chunk, N, H]
    out = jax.lax.map(lambda qc: xla_attention(qc, k, v, False), q)
    return out.swapaxes(0, 1).reshape(b, pieces * chunk, n, h)[:, :t]


ATTENTION_IMPLS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "chunked": chunked_attention,
    "cudnn": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
    "flash": flash_attention,
}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Adds an attention implementation selectable by `name` in model configs."""
    ATTENTION_IMPLS[name] = fn


def dot_product_attention(q, k, v, *, implementation: str = "xla", causal: bool = False) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v. q: `[B, T, N, H]`, k, v: `[B, S, N, H]` -> `[B, T, N, H]`."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {implementation!r}; known: {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[implementation](q, k, v, causal)


# The names of the q, k, v and output projections in the checkpoint layout a model mirrors.
DIFFUSERS_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")  # the UNet's transformers, the VAE's mid block
TRANSFORMERS_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP


class Attention(nn.Module):
    """Multi-head attention: projections q, k, v -> `dot_product_attention` -> output projection.

    Self-attention when `context` is None, cross-attention otherwise; `causal` masks later positions
    (CLIP). The parameters are named `projections` (q, k, v, out); the output projection always has a
    bias, q/k/v have one with `qkv_bias` (CLIP, the VAE; the UNet's have none).
    """

    num_heads: int
    head_dim: int
    implementation: str
    dtype: Dtype
    param_dtype: Dtype
    causal: bool = False
    qkv_bias: bool = False
    projections: tuple[str, str, str, str] = DIFFUSERS_PROJECTIONS

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: `[B, T, C]`, context: `[B, S, D]` or None -> `[B, T, C]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_name, k_name, v_name, out_name = self.projections
        inner = self.num_heads * self.head_dim
        kv_axis = "embed" if context is None else "context"
        context = x if context is None else context

        def project(name: str, in_axis: str, t: jax.Array) -> jax.Array:  # -> `[B, T, N, H]`
            y = dense(inner, (in_axis, "heads"), use_bias=self.qkv_bias, name=name, **kw)(t)
            return y.reshape(*y.shape[:2], self.num_heads, self.head_dim)

        q, k, v = project(q_name, "embed", x), project(k_name, kv_axis, context), project(v_name, kv_axis, context)
        out = dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), implementation=self.implementation, causal=self.causal
        )
        out = out.reshape(*out.shape[:2], inner)
        return dense(x.shape[-1], ("heads", "embed"), name=out_name, **kw)(out)


class MLP(nn.Module):
    """A transformer's feed-forward: Linear C -> hidden, activation, Linear -> C.

    `gated` (the UNet's GEGLU): the first Linear is 2 x hidden wide, split into `a` and `gate`, and
    `a * activation(gate)` goes on. The Linears are named `projections` (in, out).
    """

    hidden: int
    activation: str  # a key of layers.ACTIVATIONS
    gated: bool
    projections: tuple[str, str]
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, T, C]` -> `[B, T, C]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = ACTIVATIONS[self.activation]
        h = dense((1 + self.gated) * self.hidden, ("embed", "mlp"), name=self.projections[0], **kw)(x)
        if self.gated:
            a, gate = jnp.split(h, 2, axis=-1)
            h = a * act(gate)
        else:
            h = act(h)
        return dense(x.shape[-1], ("mlp", "embed"), name=self.projections[1], **kw)(h)


class TransformerBlock(nn.Module):
    """Pre-norm block: LN -> self-attention, LN -> cross-attention, LN -> GEGLU feed-forward, residuals."""

    num_heads: int
    head_dim: int
    layer_norm_eps: float
    implementation: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: `[B, T, C]`, context: `[B, S, D]` -> `[B, T, C]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.num_heads, self.head_dim, self.implementation, name=name, **kw)
        norm = lambda name: LayerNorm(self.layer_norm_eps, name=name, **kw)
        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        ff = MLP(4 * x.shape[-1], "gelu", gated=True, projections=("proj_in", "proj_out"), name="ff", **kw)
        x = x + ff(norm("norm3")(x))
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class _ScannedTransformerBlock(TransformerBlock):
    """`TransformerBlock` with the `(carry, x) -> (carry, y)` signature `nn.scan` needs."""

    def __call__(self, x, context):
        return super().__call__(x, context), None


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> `depth` x TransformerBlock -> proj_out, added to the input.

    proj_in/proj_out are per-pixel linear maps (a 1x1 conv in older checkpoints: the same maths, and
    the converter reshapes the kernel). With `scan_layers`, the blocks' parameters are stacked along a
    leading 'layers' axis under `transformer_blocks` and run with `nn.scan` (one compiled body).
    """

    depth: int
    num_heads: int
    head_dim: int
    norm_groups: int
    norm_eps: float
    layer_norm_eps: float
    implementation: str
    remat: str
    scan_layers: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: `[B, H, W, C]`, context: `[B, S, D]` -> `[B, H, W, C]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        y = GroupNorm(self.norm_groups, self.norm_eps, name="norm", **kw)(x).reshape(b, h * w, c)
        y = dense(inner, ("embed", "heads"), name="proj_in", **kw)(y)
        block_args = (self.num_heads, self.head_dim, self.layer_norm_eps, self.implementation)
        if self.scan_layers:
            scanned = nn.scan(
                maybe_remat(_ScannedTransformerBlock, self.remat),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            y, _ = scanned(*block_args, name="transformer_blocks", **kw)(y, context)
        else:
            block_cls = maybe_remat(TransformerBlock, self.remat)
            for i in range(self.depth):
                y = block_cls(*block_args, name=f"transformer_blocks_{i}", **kw)(y, context)
        y = dense(c, ("heads", "embed"), name="proj_out", **kw)(y)
        return x + y.reshape(b, h, w, c)
