"""The CLIP text encoders between transformers' layout and `sdxl_jax.models.clip.CLIPTextModel`.

transformers' `CLIPTextModel` (SDXL's `text_encoder`) and `CLIPTextModelWithProjection`
(`text_encoder_2`) share one key layout: `embeddings.*`, `encoder.layers.{i}.*`, `final_layer_norm.*`,
plus a bias-free `text_projection.weight` for the latter. The released SDXL files (transformers 4.x)
prefix all but `text_projection` with `text_model.`; since transformers 5.6 `CLIPTextModel.state_dict()`
has no prefix, while `CLIPTextModelWithProjection` keeps it. Both forms are read (the form is detected),
and transformers 5.23 loads either. The `position_ids` buffer of older files is ignored.
"""

import re
from collections.abc import Mapping

import jax
import numpy as np
from flax.linen import meta

from sdxl_jax.convert.mapping import ConversionError, flax_to_torch, torch_to_flax
from sdxl_jax.convert.torch_layouts import _IDENTITY, _LINEAR, _NORM_SCALE, LeafRule, kept
from sdxl_jax.models.clip import ACTIVATIONS, CLIPTextConfig, abstract_params

TEXT_MODEL_PREFIX = "text_model."
_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_EMBEDDING: LeafRule = kept("weight")  # nn.Embedding and nn.Embed: both `[rows, D]`
_LEAF_RULES = {"kernel": _LINEAR, "bias": _IDENTITY, "scale": _NORM_SCALE, "embedding": _EMBEDDING}
_LAYER = re.compile(r"^layers_(\d+)$")
# transformers config field -> CLIPTextConfig field, for the fields taken as they are (both directions).
_FIELDS = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "layer_norm_eps": "layer_norm_eps",
}
# transformers' CLIPTextConfig default; an `eos_token_id` of 2 selects its legacy argmax rule.
_TRANSFORMERS_DEFAULT_EOS = 49407
_LEGACY_ARGMAX_EOS = 2


def transformers_key(path: tuple[str, ...], flax_ndim: int, prefixed: bool) -> tuple[str, LeafRule]:
    """Flax path -> (transformers state-dict key, layout rule).

    ('layers_3', 'self_attn', 'q_proj', 'kernel') -> 'text_model.encoder.layers.3.self_attn.q_proj.weight'.
    """
    if path[-1] not in _LEAF_RULES or (path[-1] == "kernel" and flax_ndim != 2):
        raise KeyError(f"no layout rule for text-encoder parameter {'/'.join(path)} (rank {flax_ndim})")
    rule = _LEAF_RULES[path[-1]]
    module = [f"encoder.layers.{m.group(1)}" if (m := _LAYER.match(seg)) else seg for seg in path[:-1]]
    key = ".".join(module + [rule[0]])
    # text_projection sits beside `text_model`, never inside it.
    return (TEXT_MODEL_PREFIX + key if prefixed and path[0] != "text_projection" else key), rule


def text_encoder_key_fn(prefixed: bool):
    """(Flax path, rank) -> (transformers key, layout rule), with or without the `text_model.` prefix."""
    return lambda path, ndim: transformers_key(path, ndim, prefixed)


def text_encoder_config_from_transformers(config: Mapping, **overrides) -> CLIPTextConfig:
    """A `CLIPTextConfig` from a transformers CLIP text `config.json` dict.

    `architectures` decides the projection: CLIP-L's config carries `projection_dim: 768` too, but
    `CLIPTextModel` has no projection layer. overrides: CLIPTextConfig fields (dtype, remat, ...).
    Dropout settings are ignored (the Flax model has none; evaluation is unaffected).
    """
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise ConversionError(
            f"model_type={config['model_type']!r}: expected a 'clip_text_model' config "
            "(for a full CLIPModel config pass its 'text_config')"
        )
    architectures = config.get("architectures")
    if not architectures or len(architectures) != 1 or architectures[0] not in _ARCHITECTURES:
        raise ConversionError(f"architectures={architectures!r}: expected exactly one of {list(_ARCHITECTURES)}")
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in ACTIVATIONS:
        raise ConversionError(f"hidden_act={activation!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    eos = config.get("eos_token_id", _TRANSFORMERS_DEFAULT_EOS)
    if isinstance(eos, (list, tuple)):
        raise ConversionError(f"eos_token_id={eos!r}: a list of end tokens is not supported")
    fields = {ours: config[theirs] for theirs, ours in _FIELDS.items()} | dict(
        activation=activation,
        projection_dim=config["projection_dim"] if architectures[0] == "CLIPTextModelWithProjection" else None,
        eos_token_id=None if eos == _LEGACY_ARGMAX_EOS else eos,
    )
    return CLIPTextConfig(**(fields | overrides))


def text_encoder_params_from_transformers(state_dict: Mapping[str, np.ndarray], cfg: CLIPTextConfig, place=None):
    """Flax params (numpy, `cfg.param_dtype`, or as `place` puts each leaf) from a transformers CLIP text
    state dict, strictly.

    The key form (`text_model.`-prefixed or not) is detected; keys of the other form are then reported
    as unexpected, like any other stray tensor.
    """
    prefixed = any(k.startswith(TEXT_MODEL_PREFIX) for k in state_dict)
    target = meta.unbox(abstract_params(cfg))
    form = "prefixed" if prefixed else "unprefixed"
    what = f"transformers CLIP text state dict ({form} keys)"
    return torch_to_flax(state_dict, target, text_encoder_key_fn(prefixed), what=what, place=place)


def text_encoder_params_to_transformers(params, cfg: CLIPTextConfig, prefixed: bool = True) -> dict[str, np.ndarray]:
    """A transformers state dict from Flax params (the exact inverse of the import).

    prefixed=True writes the released SDXL files' `text_model.` keys, which every transformers version
    loads into both classes; False writes what transformers >= 5.6 `CLIPTextModel.state_dict()` has.
    """
    params = jax.tree.map(np.asarray, meta.unbox(params))
    has_projection = "text_projection" in params
    if has_projection != (cfg.projection_dim is not None):
        raise ConversionError(f"params have text_projection={has_projection}, but projection_dim={cfg.projection_dim}")
    return flax_to_torch(params, text_encoder_key_fn(prefixed))


def text_encoder_config_to_transformers(cfg: CLIPTextConfig) -> dict:
    """The transformers CLIP text `config.json` dict of `cfg` (inverse of `text_encoder_config_from_transformers`).

    `architectures` carries the projection (CLIPTextModelWithProjection iff projection_dim); a config
    without one gets `projection_dim = hidden_size`, which CLIPTextModel ignores (SDXL's CLIP-L: 768).
    The pooling rule None is transformers' legacy `eos_token_id: 2`. Token ids other than the end token,
    dropout and init settings are SDXL's values and do not change what the model computes.
    """
    architecture = _ARCHITECTURES[1] if cfg.projection_dim is not None else _ARCHITECTURES[0]
    return {theirs: getattr(cfg, ours) for theirs, ours in _FIELDS.items()} | dict(
        architectures=[architecture],
        model_type="clip_text_model",
        hidden_act=cfg.activation,
        projection_dim=cfg.projection_dim if cfg.projection_dim is not None else cfg.hidden_size,
        eos_token_id=_LEGACY_ARGMAX_EOS if cfg.eos_token_id is None else cfg.eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_factor=1.0,
        initializer_range=0.02,
    )
