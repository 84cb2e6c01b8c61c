"""SDXL's conditioning: what the UNet consumes, assembled from encoded text and micro-conditioning.

    context  [B, 77, 2048] base (CLIP-L penultimate ‖ bigG penultimate) or [B, 77, 1280] refiner
    y        [B, 2816] base: pooled bigG 1280 ‖ emb(orig_h, orig_w, crop_top, crop_left, target_h, target_w)
             [B, 2560] refiner: pooled bigG 1280 ‖ emb(orig_h, orig_w, crop_top, crop_left, aesthetic_score)

Each scalar is embedded separately with the 256-wide sinusoid of the UNet timestep (`cat[cos, sin]`,
max period 10000), height before width — the order of diffusers' `add_time_ids`. Everything here is
batched and traceable: sizes, crops and scores may be traced values, so changing them never recompiles.
"""

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel
from sdxl_jax.models.layers import timestep_embedding
from sdxl_jax.tokenizer import CONTEXT_LENGTH, TokenPair, tokenize_pair

SCALAR_EMBED_DIM = 256
POOLED_DIM = 1280  # bigG's projected end-token state


def embed_scalars(values: jax.Array, dim: int = SCALAR_EMBED_DIM) -> jax.Array:
    """`[B, n]` scalars -> fp32 `[B, n * dim]`, each scalar embedded on its own, in order."""
    values = jnp.asarray(values, jnp.float32)
    b, n = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(b, n * dim)


def _pairs(value, batch: int) -> jax.Array:
    """(h, w) for all, or `[B, 2]` per example -> fp32 `[B, 2]`."""
    value = jnp.asarray(value, jnp.float32)
    if value.shape == (2,):
        value = jnp.broadcast_to(value, (batch, 2))
    if value.shape != (batch, 2):
        raise ValueError(f"expected (h, w) or [{batch}, 2], got shape {value.shape}")
    return value


def _scalars(value, batch: int) -> jax.Array:
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        value = jnp.broadcast_to(value, (batch,))
    if value.shape != (batch,):
        raise ValueError(f"expected a scalar or [{batch}], got shape {value.shape}")
    return value


def base_time_ids(original_size, crop_top_left, target_size, batch: int) -> jax.Array:
    """`[B, 6]` (orig_h, orig_w, crop_top, crop_left, target_h, target_w); each argument (h, w) or `[B, 2]`."""
    return jnp.concatenate([_pairs(v, batch) for v in (original_size, crop_top_left, target_size)], axis=-1)


def refiner_time_ids(original_size, crop_top_left, aesthetic_score, batch: int) -> jax.Array:
    """`[B, 5]` (orig_h, orig_w, crop_top, crop_left, aesthetic_score); the score a scalar or `[B]`."""
    pairs = [_pairs(v, batch) for v in (original_size, crop_top_left)]
    return jnp.concatenate([*pairs, _scalars(aesthetic_score, batch)[:, None]], axis=-1)


def vector_conditioning(pooled: jax.Array, time_ids: jax.Array, dim: int = SCALAR_EMBED_DIM) -> jax.Array:
    """`y` `[B, P + n * dim]` from pooled text `[B, P]` and micro-conditioning `[B, n]`."""
    if pooled.shape[0] != time_ids.shape[0]:
        raise ValueError(f"pooled batch {pooled.shape[0]} != time_ids batch {time_ids.shape[0]}")
    return jnp.concatenate([pooled.astype(jnp.float32), embed_scalars(time_ids, dim)], axis=-1)


def text_context(penultimate_l: jax.Array | None, penultimate_g: jax.Array) -> jax.Array:
    """Cross-attention tokens: `[B, L, 768] ‖ [B, L, 1280]` -> `[B, L, 2048]` (base), or bigG alone (refiner)."""
    if penultimate_l is None:
        return penultimate_g
    if penultimate_l.shape[:2] != penultimate_g.shape[:2]:
        raise ValueError(f"encoder states disagree on [B, L]: {penultimate_l.shape} vs {penultimate_g.shape}")
    return jnp.concatenate([penultimate_l, penultimate_g.astype(penultimate_l.dtype)], axis=-1)


def drop_text(context: jax.Array, pooled: jax.Array, drop: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero the text parts of the examples where `drop` `[B]` (bool) is set.

    This is both the base's unconditional branch for an empty negative prompt and caption dropout
    in CFG training; the size/crop part of `y` is untouched, so assemble `y` after this.
    """
    keep = jnp.logical_not(jnp.asarray(drop, bool))
    return context * keep[:, None, None].astype(context.dtype), pooled * keep[:, None].astype(pooled.dtype)


# ---- text: frozen encoders -> (context, pooled) ----------------------------------------------------


@flax.struct.dataclass
class TextEncoders:
    """The frozen text encoders, a pytree of params (configs are static): bigG, and CLIP-L for the base.

    The refiner is exactly the case `cfg_l is None`: it conditions on bigG alone.
    """

    cfg_g: CLIPTextConfig = flax.struct.field(pytree_node=False)
    params_g: Any
    cfg_l: CLIPTextConfig | None = flax.struct.field(pytree_node=False, default=None)
    params_l: Any = None

    @property
    def is_refiner(self) -> bool:
        return self.cfg_l is None


def _encode(cfg: CLIPTextConfig, params, ids: jax.Array, eot: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Penultimate hidden states `[B, C*77, D]` and the first chunk's pooled vector `[B, P]`.

    ids `[B, 77]` / eot `[B]` (truncated) or `[B, C, 77]` / `[B, C]` (chunked: the chunks are encoded
    as separate rows and their states concatenated along the sequence).
    """
    batch = ids.shape[0]
    out = CLIPTextModel(cfg).apply({"params": params}, ids.reshape(-1, CONTEXT_LENGTH), eot.reshape(-1))
    hidden = out.hidden_states[-2]  # SDXL uses the penultimate layer, without the final norm
    pooled = out.pooled if out.text_embeds is None else out.text_embeds
    return hidden.reshape(batch, -1, hidden.shape[-1]), pooled.reshape(batch, -1, pooled.shape[-1])[:, 0]


def encode_text(encoders: TextEncoders, tokens: TokenPair) -> tuple[jax.Array, jax.Array]:
    """(context `[B, C*77, 2048 | 1280]`, pooled bigG `[B, 1280]`) from a tokenized batch."""
    hidden_g, pooled = _encode(encoders.cfg_g, encoders.params_g, tokens.ids_g, tokens.eot_g)
    hidden_l = None
    if not encoders.is_refiner:
        hidden_l, _ = _encode(encoders.cfg_l, encoders.params_l, tokens.ids_l, tokens.eot_l)
    return text_context(hidden_l, hidden_g), pooled


# ---- the conditional / unconditional pair -----------------------------------------------------------


class Conditioning(NamedTuple):
    """What the UNet consumes: context `[B, L, D]` and y `[B, adm_in_channels]`."""

    context: jax.Array
    y: jax.Array


def negative_is_zero(negative_prompts, batch: int, refiner: bool) -> np.ndarray:
    """`[B]` bool: which unconditional examples get zero text (host side, from the prompt strings).

    Base: an absent (None) or empty/whitespace negative prompt means zeros (sgm's
    `force_uc_zero_embeddings`); an explicit negative prompt is encoded. Refiner: always encoded
    (the empty prompt included). Note diffusers zeroes only `negative_prompt=None` and encodes "".
    """
    if refiner:
        return np.zeros(batch, bool)
    if negative_prompts is None:
        return np.ones(batch, bool)
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * batch
    if len(negative_prompts) != batch:
        raise ValueError(f"{len(negative_prompts)} negative prompts for {batch} prompts")
    return np.array([not p.strip() for p in negative_prompts], bool)


def condition(
    encoders: TextEncoders,
    tokens: TokenPair,
    time_ids: jax.Array,
    drop: jax.Array | None = None,
    dim: int = SCALAR_EMBED_DIM,
) -> Conditioning:
    """Conditioning for one branch; `drop` `[B]` bool zeroes the text of those examples (CFG training,
    and the base's empty negative prompt). time_ids: `base_time_ids` or `refiner_time_ids`, `[B, 6|5]`;
    dim: the UNet's `time_id_embed_dim`."""
    context, pooled = encode_text(encoders, tokens)
    if drop is not None:
        context, pooled = drop_text(context, pooled, drop)
    return Conditioning(context, vector_conditioning(pooled, time_ids, dim))


class PromptBatch(NamedTuple):
    """A batch of prompts made ready on the host for one model: both branches' tokens, which negative
    texts are zeros, and both branches' micro-conditioning (`[B, 6]` base, `[B, 5]` refiner)."""

    tokens: TokenPair
    negative_tokens: TokenPair
    negative_zero: np.ndarray
    time_ids: jax.Array
    negative_time_ids: jax.Array


def prepare_prompts(
    prompts,
    negative_prompts=None,
    *,
    refiner: bool,
    height: int = 1024,
    width: int = 1024,
    original_size=None,
    crop_top_left=(0, 0),
    target_size=None,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    mode: str = "truncate",
) -> PromptBatch:
    """Tokenize prompts and negatives and build both branches' time ids, on the host.

    original_size and target_size default to (height, width) and crop to (0, 0), SDXL's inference
    defaults; the unconditional branch copies the size/crop conditioning and, for the refiner, takes
    `negative_aesthetic_score`. In chunked mode the negative prompts get as many chunks as the prompts.
    """
    tokens = tokenize_pair(prompts, mode=mode)
    batch = tokens.ids_g.shape[0]
    chunks = {} if mode == "truncate" else dict(min_chunks=tokens.ids_g.shape[1], max_chunks=tokens.ids_g.shape[1])
    negatives = negative_prompts if negative_prompts is not None else [""] * batch
    if isinstance(negatives, str):
        negatives = [negatives] * batch
    negative_tokens = tokenize_pair(negatives, mode=mode, **chunks)
    if negative_tokens.ids_g.shape != tokens.ids_g.shape:
        raise ValueError(f"negative prompts tokenize to {negative_tokens.ids_g.shape}, prompts to {tokens.ids_g.shape}")
    zero = negative_is_zero(negative_prompts, batch, refiner)
    size = original_size or (height, width)
    if refiner:
        ids = refiner_time_ids(size, crop_top_left, aesthetic_score, batch)
        negative_ids = refiner_time_ids(size, crop_top_left, negative_aesthetic_score, batch)
    else:
        ids = negative_ids = base_time_ids(size, crop_top_left, target_size or (height, width), batch)
    return PromptBatch(tokens, negative_tokens, zero, ids, negative_ids)


def encode_prompt(
    encoders: TextEncoders, prompts, negative_prompts=None, *, time_id_embed_dim: int = SCALAR_EMBED_DIM, **options
) -> tuple[Conditioning, Conditioning]:
    """Prompts -> (conditional, unconditional) `Conditioning`, both `[B, ...]`, on the host's default device.

    options: `prepare_prompts`' keywords (height, width, original_size, crop_top_left, target_size,
    aesthetic_score, negative_aesthetic_score, mode); time_id_embed_dim: the UNet config's (256 for SDXL).
    """
    batch = prepare_prompts(prompts, negative_prompts, refiner=encoders.is_refiner, **options)
    return _condition_pair(encoders, *batch, time_id_embed_dim)


@functools.partial(jax.jit, static_argnums=6)
def _condition_pair(
    encoders, tokens, negative_tokens, zero, ids, negative_ids, dim
) -> tuple[Conditioning, Conditioning]:
    return condition(encoders, tokens, ids, dim=dim), condition(encoders, negative_tokens, negative_ids, zero, dim)
