"""The VAE between diffusers' `AutoencoderKL` layout and `sdxl_jax.models.vae.AutoencoderKL`.

`vae_config_from_diffusers` reads a diffusers `config.json` dict (refusing what the Flax model does
not implement), and `vae_params_from_diffusers` / `vae_params_to_diffusers` convert strictly in both
directions (`sdxl_jax.convert.load_vae` reads a diffusers `vae/` folder).

The Flax tree mirrors diffusers' module tree, so keys translate segment by segment; only the names
of the mid-block attention's projections depend on the checkpoint's vintage (`ATTENTION_LAYOUTS`).
"""

from collections.abc import Mapping

import jax
import numpy as np
from flax.linen import meta

from sdxl_jax.convert.mapping import ConversionError, check_tree, flax_to_torch, torch_to_flax
from sdxl_jax.convert.torch_layouts import _CONV, _IDENTITY, _LINEAR, _NORM_SCALE, LeafRule, diffusers_module_name
from sdxl_jax.models.vae import VAEConfig, abstract_params

# diffusers' `AutoencoderKL.__init__` defaults (diffusers 0.42): a config.json may omit any of these.
# Note scaling_factor: a file without one means SD 1.x's 0.18215, not SDXL's 0.13025.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,  # a pipeline hint (decode in fp32); here `VAEConfig.dtype` decides
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Fields whose value must be this for the Flax VAE to compute the same function.
_REQUIRED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
# diffusers config field -> VAEConfig field; both directions read this table.
_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "latent_channels": "latent_channels",
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "norm_num_groups": "norm_groups",
    "mid_block_add_attention": "mid_block_attention",
    "use_quant_conv": "use_quant_conv",
    "use_post_quant_conv": "use_post_quant_conv",
    "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor",
    "sample_size": "sample_size",
}
# VAEConfig field -> how its JSON value is read, where it is not taken as it is.
_READ = {
    "block_out_channels": tuple,
    "mid_block_attention": bool,
    "use_quant_conv": bool,
    "use_post_quant_conv": bool,
    "scaling_factor": float,
    "shift_factor": lambda v: None if v is None else float(v),
}

# Flax segment -> torch segment inside `mid_block/attentions_0`, per checkpoint vintage. "legacy" is
# diffusers' pre-0.14 attention block (diffusers itself still renames it on load). A layout whose
# projections are 1x1 convs (the original single-file checkpoints) needs its own leaf rules too.
ATTENTION_LAYOUTS: dict[str, dict[str, str]] = {
    "diffusers": {"group_norm": "group_norm", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out_0"},
    "legacy": {"group_norm": "group_norm", "to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"},
}


def vae_config_from_diffusers(config: Mapping, **overrides) -> VAEConfig:
    """A `VAEConfig` from a diffusers AutoencoderKL `config.json` dict; `overrides` set dtype etc."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConversionError(f"not an AutoencoderKL config: _class_name={config['_class_name']!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    full = _DIFFUSERS_DEFAULTS | dict(config)
    problems = [f"unknown field {k}={config[k]!r}" for k in unknown]
    problems += [f"{k}={full[k]!r} (supported: {v!r})" for k, v in _REQUIRED.items() if full[k] != v]
    levels = len(full["block_out_channels"])
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(full[name])
        if len(types) != levels:
            problems.append(f"{name} has {len(types)} entries for {levels} levels of block_out_channels")
        problems += [f"{name} entry {t!r} (supported: {block!r})" for t in types if t != block]
    if not isinstance(full["layers_per_block"], int):
        problems.append(f"layers_per_block={full['layers_per_block']!r} (supported: one int)")
    if problems:
        raise ConversionError("unsupported diffusers VAE config: " + "; ".join(problems))
    fields = {ours: _READ.get(ours, lambda v: v)(full[theirs]) for theirs, ours in _FIELDS.items()}
    return VAEConfig(**(fields | overrides))


def _leaf_rule(path: tuple[str, ...], flax_ndim: int) -> LeafRule:
    leaf = path[-1]
    if leaf == "bias":
        return _IDENTITY
    if leaf == "scale":
        return _NORM_SCALE
    if leaf == "kernel":
        return _CONV if flax_ndim == 4 else _LINEAR
    raise KeyError(f"no layout rule for parameter {'/'.join(path)}")


def vae_torch_key(path: tuple[str, ...], flax_ndim: int, attention_layout: str = "diffusers") -> tuple[str, LeafRule]:
    """Flax VAE parameter path -> (PyTorch state-dict key, layout rule).

    ('decoder', 'mid_block', 'attentions_0', 'to_out_0', 'kernel') -> 'decoder.mid_block.attentions.0.to_out.0.weight'
    """
    if attention_layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"unknown attention layout {attention_layout!r}; known: {sorted(ATTENTION_LAYOUTS)}")
    module = list(path[:-1])
    if len(module) > 3 and module[1:3] == ["mid_block", "attentions_0"]:
        module[3] = ATTENTION_LAYOUTS[attention_layout][module[3]]
    rule = _leaf_rule(path, flax_ndim)
    return f"{diffusers_module_name(tuple(module))}.{rule[0]}", rule


def vae_key_fn(attention_layout: str = "diffusers"):
    """(Flax path, rank) -> (diffusers key, layout rule) for a checkpoint of `attention_layout`'s vintage."""
    return lambda path, ndim: vae_torch_key(path, ndim, attention_layout)


def vae_params_from_diffusers(
    state_dict: Mapping[str, np.ndarray], cfg: VAEConfig, place=None, *, attention_layout: str = "diffusers"
):
    """Flax VAE params (numpy, `cfg.param_dtype`, or as `place` puts each leaf) from a diffusers
    AutoencoderKL state dict, strictly."""
    target = meta.unbox(abstract_params(cfg))
    key_fn = vae_key_fn(attention_layout)
    return torch_to_flax(state_dict, target, key_fn, what="diffusers VAE state dict", place=place)


def vae_params_to_diffusers(params, cfg: VAEConfig, *, attention_layout: str = "diffusers") -> dict[str, np.ndarray]:
    """A diffusers AutoencoderKL state dict from Flax VAE params (the exact inverse of the import)."""
    params = jax.tree.map(np.asarray, meta.unbox(params))
    check_tree("Flax VAE params do not match the config", params, abstract_params(cfg))
    return flax_to_torch(params, vae_key_fn(attention_layout))


_DIFFUSERS_NORM_EPS = 1e-6  # diffusers builds every GroupNorm of AutoencoderKL with this eps


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """The diffusers `AutoencoderKL` config.json dict of `cfg` (the inverse of `vae_config_from_diffusers`).

    Runtime fields (dtype, param_dtype, attention) are not part of a diffusers config; `force_upcast`
    (decode in fp32 under an fp16 pipeline) is written True, as SDXL's VAE needs.
    """
    if cfg.norm_eps != _DIFFUSERS_NORM_EPS:
        what = f"norm_eps={cfg.norm_eps} (diffusers: {_DIFFUSERS_NORM_EPS})"
        raise ConversionError(f"VAE config has no diffusers equivalent: {what}")
    levels = len(cfg.block_out_channels)
    fields = {theirs: getattr(cfg, ours) for theirs, ours in _FIELDS.items()}
    return (
        fields
        | _REQUIRED
        | dict(
            _class_name="AutoencoderKL",
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            block_out_channels=list(cfg.block_out_channels),
            force_upcast=True,
        )
    )
