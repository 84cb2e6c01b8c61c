"""Flash attention for TPU: Pallas's splash-attention kernel as `ATTENTION_IMPLS['flash']`.

    out = flash_attention(q, k, v, causal)   # q `[B, T, N, H]`, k/v `[B, S, N, H]` -> `[B, T, N, H]`

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) never materialises the `[T, S]`
scores: its forward keeps a running softmax in fp32 over kv blocks, and its custom VJP recomputes the
probabilities from the saved log-sum-exp, so neither pass holds `[B, N, T, S]` in memory. Pallas's
other TPU kernel (`ops.tpu.flash_attention`) has no interpret mode, so it cannot be run off-TPU.

- Platform: the same kernel runs compiled (Mosaic) for TPU and in Pallas interpret mode anywhere
  else (CPU tests). The choice is `jax.lax.platform_dependent`, resolved when the program is lowered
  for its platform, not when it is traced: a deviceless TPU compile from a CPU host (`jax.devices()`
  all CPU) still gets the Mosaic kernel. Both branches trace the same kernel, so their backward
  residuals have the same types and are shared, not doubled.
- Short keys go to XLA: with fewer than 128 keys (SDXL's cross-attention over 77 text tokens, CLIP's
  77-token causal self-attention) the `[T, S]` scores are small, and on a v5e compile the kernel
  moved more bytes than XLA's fused attention (77-key cross-attention, fwd + bwd: 521 vs 298 MiB)
  because the keys must be padded to 128 and every operand transposed. So `flash` is the kernel for
  the long self-attentions (the UNet's 4096 and 1024 tokens, the VAE's 16384 pixels) only.
- Lengths: the kernel (`splash_attention`) needs T and S in multiples of 128. Ragged sequences are
  padded to the next multiple with zeros; padded keys get segment id 1 (queries 0) so no query sees
  them, and padded query rows are sliced off (zero cotangent).
- Causal (CLIP): the kernel's own `CausalMask` (query i sees keys j <= i, as the 'xla' path), which
  skips the blocks above the diagonal.
- Blocks: 512 q x 512 kv where the padded length allows (SDXL's 4096- and 1024-token self-attention,
  the VAE's 16384 pixels), else the largest of 256, 128 that divides it; the same for both backward
  kernels.
- Sharding: a `pallas_call` cannot be split by XLA's partitioner. When a mesh is set
  (`jax.set_mesh`, as `sharding.tracing_context` does), the kernel runs under `jax.shard_map` with
  batch and heads split as the flax logical rules map `act_batch` and `act_heads` (sequence and head
  width whole on each device); a mesh axis that does not divide its dimension is left out
  (replicated over it). Without a mesh it is called directly: under `jit` with sharded inputs XLA then
  gathers them onto every device, so train with `activation_constraints` on.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

LANES = 128  # the kernel's sequence lengths are multiples of this
SHORT_KEYS = 128  # fewer keys than this: XLA's attention (see the module docstring)
BLOCK_CHOICES = (512, 256, 128)  # tried in order: the largest that divides the padded length


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v: the splash kernel, or XLA's attention for fewer than `SHORT_KEYS` keys.
    q: `[B, T, N, H]`, k, v: `[B, S, N, H]` -> `[B, T, N, H]`."""
    if k.shape[1] < SHORT_KEYS:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    return splash_attention(q, k, v, causal)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v by the splash kernel at any lengths. q: `[B, T, N, H]`, k, v: `[B, S, N, H]`
    -> `[B, T, N, H]`. Under a mesh, one kernel per device on its batch x heads shard (module docstring).
    """
    mesh = jax.sharding.get_abstract_mesh()
    attend = lambda q, k, v: _attention(q, k, v, causal)
    if mesh.empty:
        return attend(q, k, v)
    spec = activation_spec(q.shape, mesh)
    # check_vma=False: splash's pallas_call does not declare how its outputs vary over mesh axes.
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def activation_spec(shape: tuple[int, ...], mesh) -> PartitionSpec:
    """The `[B, L, N, H]` spec inside the kernel: batch and heads as the current logical rules map
    `act_batch` and `act_heads`, keeping of each rule's mesh axes those that divide the dimension; L and H
    whole. With no rules in context, everything is replicated."""
    rule = nn.logical_to_mesh_axes(("act_batch", "act_length", "act_heads", None))

    def fit(axes, dim):  # the rule's mesh axes, in order, while their product still divides dim
        kept = []
        for a in axes if isinstance(axes, tuple) else (axes,):
            if a in mesh.axis_names and dim % math.prod(mesh.shape[b] for b in (*kept, a)) == 0:
                kept.append(a)
        return tuple(kept) if len(kept) > 1 else (kept[0] if kept else None)

    return PartitionSpec(fit(rule[0], shape[0]), None, fit(rule[2], shape[2]), None)


def block_size(length: int) -> int:
    """The q or kv block for a (padded, multiple of 128) sequence length."""
    return next(b for b in BLOCK_CHOICES if length % b == 0)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """One device's attention: pad to kernel lengths, `[B, L, N, H]` -> `[B, N, L, H]`, the kernel per
    example, back. The kernel takes no scale, so q is scaled by 1/sqrt(H) first."""
    _, t, heads, head_dim = q.shape
    s = k.shape[1]
    t_pad, s_pad = -t % LANES, -s % LANES
    q = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(q.dtype)  # one rounding, not the scale's too
    q = jnp.pad(q, ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, s_pad), (0, 0), (0, 0))) for x in (k, v))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    segments = None
    if s_pad:  # padded keys in segment 1, every query in segment 0
        segments = splash.SegmentIds(
            q=jnp.zeros((t + t_pad,), jnp.int32), kv=(jnp.arange(s + s_pad) >= s).astype(jnp.int32)
        )

    def run(q, k, v, *, interpret: bool):
        kernel = _kernel(heads, t + t_pad, s + s_pad, causal, interpret)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k, v)

    out = jax.lax.platform_dependent(
        q, k, v, tpu=lambda *a: run(*a, interpret=False), default=lambda *a: run(*a, interpret=True)
    )
    return out.transpose(0, 2, 1, 3)[:, :t]


def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool) -> splash.SplashAttentionKernel:
    """The splash kernel for one example `[N, q_len, H]` x `[N, kv_len, H]`, forward and backward blocks."""
    bq, bkv = block_size(q_len), block_size(kv_len)
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )  # fmt: skip
    shape = (q_len, kv_len)
    mask = splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)
    return splash.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
