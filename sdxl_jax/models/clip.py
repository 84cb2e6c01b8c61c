"""The CLIP text encoders of SDXL (OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) as one Linen module.

Layout (transformers' names, which the converter maps 1:1): embeddings (token + learned position) ->
`num_layers` pre-norm encoder layers (LN -> causal self-attention, LN -> MLP, residuals) ->
final_layer_norm, then the hidden state at the end token (`pooled`), optionally times
`text_projection` (`text_embeds`). SDXL's cross-attention context is the *penultimate* entry of
`hidden_states` (no final norm); its vector conditioning uses bigG's `text_embeds`.
"""

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.attention import MLP, TRANSFORMERS_PROJECTIONS, Attention
from sdxl_jax.models.config import ModelConfig, abstract_params_of, check_choice
from sdxl_jax.models.layers import ACTIVATIONS, LayerNorm, dense, maybe_remat, param_count


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """Hyper-parameters of a CLIP text transformer (+ optional bias-free output projection)."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77  # the longest accepted sequence; shorter inputs use a prefix
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    activation: str = "quick_gelu"  # a key of ACTIVATIONS
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # width of `text_projection`; None = no projection (CLIPTextModel)
    # Which token is pooled. None: the largest id of each row (OpenAI's rule, the end token 49407 being
    # the largest id; transformers' legacy `eos_token_id == 2` path, which SDXL's configs take).
    # An int: the first occurrence of that id (transformers' path for any other eos_token_id).
    eos_token_id: int | None = None
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    attention: str = "xla"  # a key of ATTENTION_IMPLS
    remat: str = "none"  # a key of REMAT_POLICIES

    def validate(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_heads} heads")
        check_choice("activation", self.activation, ACTIVATIONS)
        if self.eos_token_id == 2:
            # In transformers eos_token_id == 2 *means* the argmax rule, never "find id 2".
            raise ValueError("eos_token_id=2 is transformers' marker for the argmax rule: use eos_token_id=None")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"projection_dim must be positive or None, got {self.projection_dim}")

    @classmethod
    def clip_vit_l14(cls, **overrides) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text encoder, SDXL's `text_encoder`: 123,060,480 parameters."""
        return cls(**overrides)

    @classmethod
    def openclip_vit_bigg14(cls, **overrides) -> "CLIPTextConfig":
        """OpenCLIP ViT-bigG/14 text encoder + projection, SDXL's `text_encoder_2`: 694,659,840 parameters."""
        fields = dict(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20)
        fields |= dict(activation="gelu", projection_dim=1280)
        return cls(**(fields | overrides))

    @classmethod
    def tiny(cls, **overrides) -> "CLIPTextConfig":
        """A CLIP-shaped text encoder small enough for CPU tests."""
        fields = dict(vocab_size=64, max_position_embeddings=16, hidden_size=32, intermediate_size=64)
        fields |= dict(num_layers=3, num_heads=4)
        return cls(**(fields | overrides))


class CLIPTextOutput(NamedTuple):
    """What `CLIPTextModel` returns; B = batch, L = sequence length, D = hidden_size.

    Returning every hidden state costs nothing under `jit`: XLA drops the ones a caller does not use.
    """

    hidden_states: tuple[jax.Array, ...]  # num_layers + 1 of `[B, L, D]`: embeddings, each layer (no final norm)
    last_hidden_state: jax.Array  # `[B, L, D]`: the last layer's output after final_layer_norm
    pooled: jax.Array  # `[B, D]`: last_hidden_state at the end token
    text_embeds: jax.Array | None  # `[B, projection_dim]`: pooled @ text_projection; None without projection


def end_token_positions(input_ids: jax.Array, eos_token_id: int | None) -> jax.Array:
    """The pooled position of each row, exactly as transformers picks it: ids `[B, L]` -> int32 `[B]`.

    Ties go to the first position (here and in torch), which matters for CLIP-L: it pads with the end
    token itself. A row without `eos_token_id` pools position 0, as in transformers.
    """
    if eos_token_id is None:
        return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
    return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding (positions 0..L-1)."""

    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: int `[B, L]` -> `[B, L, D]`."""
        cfg = self.cfg

        def table(rows: int, names: tuple[str, str], name: str) -> nn.Embed:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), names)
            return nn.Embed(rows, cfg.hidden_size, embedding_init=init, name=name, **cfg.dtypes)

        token = table(cfg.vocab_size, ("vocab", "embed"), "token_embedding")
        position = table(cfg.max_position_embeddings, ("length", "embed"), "position_embedding")
        return token(input_ids) + position(jnp.arange(input_ids.shape[1]))[None]


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN1(x)), then + mlp(LN2(.))."""

    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, L, D]` -> `[B, L, D]`."""
        cfg, kw = self.cfg, self.cfg.dtypes
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        attn = Attention(heads, head_dim, cfg.attention, causal=True, qkv_bias=True,
                         projections=TRANSFORMERS_PROJECTIONS, name="self_attn", **kw)  # fmt: skip
        mlp = MLP(cfg.intermediate_size, cfg.activation, gated=False, projections=("fc1", "fc2"), name="mlp", **kw)
        x = x + attn(LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x))
        x = x + mlp(LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x))
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class CLIPTextModel(nn.Module):
    """`CLIPTextModel(cfg).apply({"params": p}, input_ids, eot_positions=None)` -> `CLIPTextOutput`.

    input_ids: int `[B, L]`, L <= max_position_embeddings. eot_positions: int `[B]` or None: the
    position to pool in each row (e.g. from the tokenizer); None applies `cfg.eos_token_id`'s rule to
    the ids. A position outside `[-L, L)` gives NaN in `pooled`/`text_embeds` instead of a silent clamp.
    There is no padding `attention_mask`: SDXL never uses one (its rows are full 77-token sequences,
    and the causal mask already keeps the padding after the end token out of every earlier position).
    Outputs are in the compute dtype.
    """

    cfg: CLIPTextConfig

    def _check_inputs(self, input_ids: jax.Array, eot_positions: jax.Array | None):
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer [B, L] array, got {input_ids.dtype} {input_ids.shape}")
        (b, length), limit = input_ids.shape, self.cfg.max_position_embeddings
        if length > limit:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {limit}")
        if eot_positions is None:
            return
        if eot_positions.shape != (b,) or not jnp.issubdtype(eot_positions.dtype, jnp.integer):
            got = f"{eot_positions.dtype} {eot_positions.shape}"
            raise ValueError(f"eot_positions must be an integer [{b}] array, got {got}")

    @nn.compact
    def __call__(self, input_ids: jax.Array, eot_positions: jax.Array | None = None) -> CLIPTextOutput:
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        eot_positions = None if eot_positions is None else jnp.asarray(eot_positions)
        self._check_inputs(input_ids, eot_positions)
        kw = cfg.dtypes

        h = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
        hidden_states = [h]
        layer_cls = maybe_remat(CLIPEncoderLayer, cfg.remat)
        for i in range(cfg.num_layers):
            h = layer_cls(cfg, name=f"layers_{i}")(h)
            hidden_states.append(h)
        last = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(h)

        if eot_positions is None:
            eot_positions = end_token_positions(input_ids, cfg.eos_token_id)
        pooled = last.at[jnp.arange(last.shape[0]), eot_positions].get(mode="fill", fill_value=jnp.nan)
        text_embeds = None
        if cfg.projection_dim is not None:
            # "vector": the projected embedding is the pooled-text part of SDXL's vector conditioning y.
            proj = dense(cfg.projection_dim, ("embed", "vector"), use_bias=False, name="text_projection", **kw)
            text_embeds = proj(pooled)
        return CLIPTextOutput(tuple(hidden_states), last, pooled, text_embeds)


def abstract_params(cfg: CLIPTextConfig, batch: int = 1, length: int = 1):
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s (nothing is allocated);
    cached (`config.abstract_params_of`): read-only."""
    return abstract_params_of(_trace_params, cfg, batch, length)


def _trace_params(cfg: CLIPTextConfig, batch: int = 1, length: int = 1):
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s (nothing is allocated)."""
    ids = jnp.zeros((batch, length), jnp.int32)
    return jax.eval_shape(lambda: CLIPTextModel(cfg).init(jax.random.key(0), ids)["params"])


def clip_param_count(cfg: CLIPTextConfig) -> int:
    """Exact parameter count from `jax.eval_shape`."""
    return param_count(abstract_params(cfg))
