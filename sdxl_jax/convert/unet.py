"""The UNet between diffusers' `UNet2DConditionModel` layout and `sdxl_jax.models.UNet`.

`unet_config_from_diffusers` reads a diffusers `config.json` dict (refusing features the Flax model
does not implement), `unet_params_from_diffusers` converts its state dict strictly.
"""

from collections.abc import Mapping

import jax
import numpy as np
from flax.linen import meta

from sdxl_jax.convert.mapping import ConversionError, flax_to_torch, torch_to_flax
from sdxl_jax.convert.torch_layouts import unet_torch_key
from sdxl_jax.models.unet import UNetConfig, abstract_params

# diffusers config fields whose value must be this for the Flax UNet to compute the same function.
_REQUIRED = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "cross_attention_norm": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
}
# Fields diffusers' SDXL configs carry that no UNetConfig field corresponds to (written as they are).
_DIFFUSERS_UNUSED = {
    "addition_embed_type_num_heads": 64,  # diffusers' default; used only by the "text" embedding type
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "upcast_attention": None,
}
_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def _per_level(value, levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ConversionError(f"{name}={value} needs {levels} entries")
        return list(value)
    return [value] * levels


def unet_config_from_diffusers(config: Mapping, **overrides) -> UNetConfig:
    """A `UNetConfig` from a diffusers UNet `config.json` dict; `overrides` set dtype, remat, etc."""
    unsupported = [
        f"{k}={config[k]!r} (supported: {v!r})" for k, v in _REQUIRED.items() if k in config and config[k] != v
    ]
    if config.get("only_cross_attention") not in (None, False):
        unsupported.append(f"only_cross_attention={config['only_cross_attention']!r}")
    channels = list(config["block_out_channels"])
    levels = len(channels)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for name, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        unsupported += [f"{name} entry {t!r}" for t in types if t not in known]
    if unsupported:
        raise ConversionError("unsupported diffusers UNet config: " + "; ".join(unsupported))
    has_attn = [_DOWN[t] for t in down]
    if [_UP[t] for t in reversed(up)] != has_attn:
        raise ConversionError(f"up_block_types {up} do not mirror down_block_types {down}")
    if any(c % channels[0] for c in channels):
        raise ConversionError(f"block_out_channels {channels} are not multiples of the first")
    res_blocks = set(_per_level(config.get("layers_per_block", 2), levels, "layers_per_block"))
    if len(res_blocks) != 1:
        raise ConversionError(f"layers_per_block must be the same at every level, got {config['layers_per_block']}")
    depths = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if any(isinstance(d, (list, tuple)) for d in depths):
        raise ConversionError("per-block transformer_layers_per_block lists are not supported")
    # diffusers' `attention_head_dim` historically holds the number of heads; `num_attention_heads`
    # wins when set. Either way it is per level; the middle block uses the last level's.
    heads = _per_level(config.get("num_attention_heads") or config["attention_head_dim"], levels, "attention heads")
    attn_levels = [i for i in range(levels) if has_attn[i]] + [levels - 1]
    head_dims = {channels[i] // heads[i] for i in attn_levels}
    head_counts = {heads[i] for i in attn_levels}
    if len(head_dims) == 1:
        head_kw = dict(head_dim=head_dims.pop(), num_heads=None)
    elif len(head_counts) == 1:
        head_kw = dict(head_dim=None, num_heads=head_counts.pop())
    else:
        raise ConversionError(f"heads per level {heads} give neither one head width nor one head count")
    cross_dim = config["cross_attention_dim"]
    if isinstance(cross_dim, (list, tuple)):
        raise ConversionError(f"per-level cross_attention_dim {cross_dim} is not supported")
    add_type = config.get("addition_embed_type")
    if add_type not in (None, "text_time"):
        raise ConversionError(f"addition_embed_type={add_type!r} is not supported (only 'text_time' or None)")
    fields = dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=res_blocks.pop(),
        transformer_depth=tuple(d if a else 0 for d, a in zip(depths, has_attn)),
        transformer_depth_middle=depths[-1],
        context_dim=cross_dim,
        adm_in_channels=config["projection_class_embeddings_input_dim"] if add_type == "text_time" else None,
        time_id_embed_dim=config.get("addition_time_embed_dim") or 256,
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        **head_kw,
    )
    return UNetConfig(**(fields | overrides))


def stack_scanned_blocks(params):
    """`transformer_blocks_0..n-1` subtrees -> one `transformer_blocks` subtree stacked on axis 0."""
    if not isinstance(params, Mapping):
        return params
    out = {k: stack_scanned_blocks(v) for k, v in params.items() if not k.startswith("transformer_blocks_")}
    depth = sum(k.startswith("transformer_blocks_") for k in params)
    blocks = [params[f"transformer_blocks_{i}"] for i in range(depth)]
    if blocks:
        out["transformer_blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return out


def unstack_scanned_blocks(params):
    """The inverse of `stack_scanned_blocks`."""
    if not isinstance(params, Mapping):
        return params
    out = {k: unstack_scanned_blocks(v) for k, v in params.items() if k != "transformer_blocks"}
    if "transformer_blocks" in params:
        stacked = params["transformer_blocks"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(depth):
            out[f"transformer_blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def unet_key_fn(cfg: UNetConfig):
    """(Flax path, rank) -> (diffusers key, layout rule) for the UNet of `cfg` (its unscanned tree)."""
    return lambda path, ndim: unet_torch_key(path, ndim, cfg.use_linear_projection)


def unet_params_from_diffusers(state_dict: Mapping[str, np.ndarray], cfg: UNetConfig, place=None):
    """Flax UNet params (numpy, `cfg.param_dtype`) from a diffusers UNet state dict, strictly.
    place: `mapping.LeafPlacer` for each leaf (not for `scan_layers` trees: those are stacked on the host)."""
    flat_cfg = cfg.replace(scan_layers=False)
    target = meta.unbox(abstract_params(flat_cfg))
    place = None if cfg.scan_layers else place
    params = torch_to_flax(state_dict, target, unet_key_fn(cfg), what="diffusers UNet state dict", place=place)
    return stack_scanned_blocks(params) if cfg.scan_layers else params


def unet_params_to_diffusers(params, cfg: UNetConfig) -> dict[str, np.ndarray]:
    """A diffusers UNet state dict from Flax UNet params (the exact inverse of the import)."""
    params = meta.unbox(params)
    if cfg.scan_layers:
        params = unstack_scanned_blocks(params)
    return flax_to_torch(jax.tree.map(np.asarray, params), unet_key_fn(cfg))


# Norms diffusers builds with a fixed eps: each spatial transformer's opening GroupNorm and the
# transformer blocks' LayerNorms. A UNetConfig with other values has no diffusers config.
_DIFFUSERS_FIXED_EPS = {"transformer_norm_eps": 1e-6, "layer_norm_eps": 1e-5}


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int = 128) -> dict:
    """The diffusers `UNet2DConditionModel` config.json dict of `cfg` (inverse of `unet_config_from_diffusers`).

    sample_size: the latent side diffusers pipelines default to (SDXL: 1024 px / 8 = 128); UNetConfig
    has no such field. Runtime fields (dtype, param_dtype, attention, remat, scan_layers) are not part
    of a diffusers config. Heads are written as diffusers' per-level `attention_head_dim` (the number of
    heads), so a `num_heads` config whose attention levels all have one width reads back as the
    equivalent `head_dim` config. Raises ConversionError for what diffusers cannot express.
    """
    fixed = _DIFFUSERS_FIXED_EPS.items()
    problems = [f"{k}={getattr(cfg, k)} (diffusers: {v})" for k, v in fixed if getattr(cfg, k) != v]
    if cfg.transformer_depth_middle < 1:
        problems.append(f"transformer_depth_middle={cfg.transformer_depth_middle} (diffusers' mid block has attention)")
    last = cfg.transformer_depth[-1]
    if last and last != cfg.transformer_depth_middle:
        problems.append(f"transformer_depth[-1]={last} != transformer_depth_middle={cfg.transformer_depth_middle} "
                        "(diffusers' mid block takes the last level's depth)")  # fmt: skip
    if problems:
        raise ConversionError("UNet config has no diffusers equivalent: " + "; ".join(problems))
    # One int when every transformer has the same depth (the refiner's `4`), else per level; a level
    # without attention ignores its entry (1, as in SDXL's [1, 2, 10]), the last entry is the middle's.
    depths = {d for d in cfg.transformer_depth if d} | {cfg.transformer_depth_middle}
    if len(depths) == 1:
        layers_per_block = depths.pop()
    else:
        layers_per_block = [d or 1 for d in cfg.transformer_depth[:-1]] + [cfg.transformer_depth_middle]
    has_attention = [d > 0 for d in cfg.transformer_depth]
    down_names, up_names = {v: k for k, v in _DOWN.items()}, {v: k for k, v in _UP.items()}
    add_time = cfg.adm_in_channels is not None
    return dict(
        _REQUIRED,
        **_DIFFUSERS_UNUSED,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=list(cfg.level_channels),
        down_block_types=[down_names[a] for a in has_attention],
        up_block_types=[up_names[a] for a in reversed(has_attention)],
        layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=layers_per_block,
        attention_head_dim=[cfg.heads(ch)[0] for ch in cfg.level_channels],
        num_attention_heads=None,
        cross_attention_dim=cfg.context_dim,
        use_linear_projection=cfg.use_linear_projection,
        addition_embed_type="text_time" if add_time else None,
        addition_time_embed_dim=cfg.time_id_embed_dim,
        projection_class_embeddings_input_dim=cfg.adm_in_channels,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        sample_size=sample_size,
    )
