"""DINOv2 between transformers' `Dinov2Model` layout and `sdxl_jax.models.dinov2.Dinov2Model`.

The Flax tree mirrors transformers' module tree (`layers_{i}` <-> `encoder.layer.{i}`), and the CLS,
mask and position tensors keep their PyTorch shapes. The attention projections have two spellings:

    transformers 4 (the files on the Hub; what 5.23's `save_pretrained` still writes):
        encoder.layer.{i}.attention.attention.{query,key,value}.*, encoder.layer.{i}.attention.output.dense.*
    transformers 5 (`Dinov2Model.state_dict()`, renamed at load time):
        encoder.layer.{i}.attention.{q_proj,k_proj,v_proj,o_proj}.*

Both are read (the spelling is detected; keys of the other spelling are then unexpected, like any other
stray tensor). Keys carry no prefix: a `Dinov2ForImageClassification` file (`dinov2.*`, `classifier.*`)
is refused by the strict check. SwiGLU models (ViT-g/14) are refused.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax.linen import meta

from sdxl_jax import storage
from sdxl_jax.convert.export import write_safetensors
from sdxl_jax.convert.files import Prefetch, component_weights, open_state_dict, source_files, stored_dtype, whole_files
from sdxl_jax.convert.mapping import ConversionError, flax_to_torch, torch_to_flax
from sdxl_jax.convert.torch_layouts import _CONV, _IDENTITY, _LINEAR, _NORM_SCALE, LeafRule, kept
from sdxl_jax.models.dinov2 import Dinov2Config, abstract_params
from sdxl_jax.models.layers import ACTIVATIONS

# transformers 5 attention module -> transformers 4 spelling (under `encoder.layer.{i}.attention.`).
LEGACY_ATTENTION = {"q_proj": "attention.query", "k_proj": "attention.key", "v_proj": "attention.value",
                    "o_proj": "output.dense"}  # fmt: skip
_LEGACY_MARK = re.compile(r"\.attention\.(attention\.(query|key|value)|output\.dense)\.")
_LEAF_RULES: dict[str, LeafRule] = {
    "bias": _IDENTITY,
    "scale": _NORM_SCALE,
    **{name: kept(name) for name in ("lambda1", "cls_token", "mask_token", "position_embeddings")},
}
_LAYER = re.compile(r"^layers_(\d+)$")

# transformers config field -> Dinov2Config field, for the fields taken as they are.
_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "hidden_act": "activation",
    "layer_norm_eps": "layer_norm_eps",
    "num_channels": "num_channels",
    "qkv_bias": "qkv_bias",
    "layerscale_value": "layerscale_value",
    "use_mask_token": "use_mask_token",
}
# transformers 5.23 `Dinov2Config` defaults, for the fields an older config.json may leave out.
_TRANSFORMERS_DEFAULTS = dict(
    mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3,
    qkv_bias=True, layerscale_value=1.0, use_mask_token=True,
)  # fmt: skip


def transformers_key(path: tuple[str, ...], flax_ndim: int, legacy: bool) -> tuple[str, LeafRule]:
    """Flax path -> (transformers state-dict key, layout rule).

    ('layers_3', 'attention', 'q_proj', 'kernel') -> 'encoder.layer.3.attention.q_proj.weight', or with
    `legacy` (transformers 4) 'encoder.layer.3.attention.attention.query.weight'.
    """
    leaf = path[-1]
    if leaf == "kernel" and flax_ndim in (2, 4):
        rule = _LINEAR if flax_ndim == 2 else _CONV
    elif leaf in _LEAF_RULES:
        rule = _LEAF_RULES[leaf]
    else:
        raise KeyError(f"no layout rule for DINOv2 parameter {'/'.join(path)} (rank {flax_ndim})")
    module = [f"encoder.layer.{m.group(1)}" if (m := _LAYER.match(seg)) else seg for seg in path[:-1]]
    if legacy and len(module) >= 2 and module[-2] == "attention" and module[-1] in LEGACY_ATTENTION:
        module[-1] = LEGACY_ATTENTION[module[-1]]
    return ".".join(module + [rule[0]]), rule


def dinov2_key_fn(legacy: bool):
    """(Flax path, rank) -> (transformers key, layout rule), in the transformers 4 (`legacy`) or 5 spelling."""
    return lambda path, ndim: transformers_key(path, ndim, legacy)


def is_legacy(keys) -> bool:
    """Whether a state dict's keys use transformers 4's attention names (any one of them decides)."""
    return any(_LEGACY_MARK.search(key) for key in keys)


def _square(config: Mapping, field: str) -> int:
    value = config.get(field, _TRANSFORMERS_DEFAULTS[field])
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{field}={value!r}: only square sizes are supported")
        value = value[0]
    return value


def dinov2_config_from_transformers(config: Mapping, **overrides) -> Dinov2Config:
    """A `Dinov2Config` from a transformers DINOv2 `config.json` dict.

    overrides: Dinov2Config fields (dtype, remat, ...). Dropout, drop-path and backbone settings are
    ignored (the Flax model has none; evaluation is unaffected).
    """
    if config.get("model_type") != "dinov2":
        raise ConversionError(f"model_type={config.get('model_type')!r}: expected a 'dinov2' config "
                              "(DINOv2 with registers is a different model)")  # fmt: skip
    if config.get("use_swiglu_ffn", False):
        raise ConversionError("use_swiglu_ffn=True (the ViT-g/14 SwiGLU MLP) is not supported")
    fields = {ours: config.get(theirs, _TRANSFORMERS_DEFAULTS.get(theirs)) for theirs, ours in _FIELDS.items()}
    if missing := [theirs for theirs, ours in _FIELDS.items() if fields[ours] is None]:
        raise ConversionError(f"config.json lacks {missing}")
    if (activation := fields["activation"]) not in ACTIVATIONS:
        raise ConversionError(f"hidden_act={activation!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    if fields["mlp_ratio"] != int(fields["mlp_ratio"]):
        raise ConversionError(f"mlp_ratio={fields['mlp_ratio']!r}: only whole ratios are supported")
    fields |= dict(mlp_ratio=int(fields["mlp_ratio"]), image_size=_square(config, "image_size"),
                   patch_size=_square(config, "patch_size"))  # fmt: skip
    return Dinov2Config(**(fields | overrides))


def dinov2_params_from_transformers(state_dict: Mapping[str, np.ndarray], cfg: Dinov2Config, place=None):
    """Flax params (numpy, `cfg.param_dtype`, or as `place` puts each leaf) from a transformers
    `Dinov2Model` state dict in either spelling, strictly: every tensor consumed once, every parameter
    produced once, offenders named (`mapping.torch_to_flax`)."""
    legacy = is_legacy(state_dict.keys())
    what = f"transformers Dinov2Model state dict (transformers {4 if legacy else 5} attention names)"
    target = meta.unbox(abstract_params(cfg))
    return torch_to_flax(state_dict, target, dinov2_key_fn(legacy), what=what, place=place, ignorable=())


def dinov2_params_to_transformers(params, legacy: bool = True) -> dict[str, np.ndarray]:
    """A transformers state dict from Flax params (the exact inverse of the import): transformers 4 names
    (`legacy`, what the Hub's files hold and every transformers version loads) or 5's `state_dict()` names."""
    return flax_to_torch(jax.tree.map(np.asarray, meta.unbox(params)), dinov2_key_fn(legacy))


def dinov2_config_to_transformers(cfg: Dinov2Config) -> dict:
    """The transformers `config.json` dict of `cfg` (`dinov2_config_from_transformers` inverts it)."""
    theirs = {theirs: getattr(cfg, ours) for theirs, ours in _FIELDS.items()}
    return theirs | dict(model_type="dinov2", architectures=["Dinov2Model"], image_size=cfg.image_size,
                         patch_size=cfg.patch_size, use_swiglu_ffn=False)  # fmt: skip


def save_dinov2(folder: str | Path, cfg: Dinov2Config, params) -> Path:
    """Write `params` of `cfg` as a local transformers folder (`config.json` + `model.safetensors`,
    transformers 4 names, the params' dtype), which `load_dinov2` and `Dinov2Model.from_pretrained` read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", dinov2_params_to_transformers(params), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dinov2_config_to_transformers(cfg), indent=2))
    return folder


def dinov2_config_at(path: str | Path, default: Dinov2Config, **config_overrides) -> Dinov2Config:
    """The architecture of the DINOv2 weights at `path` without reading them: a transformers folder's
    `config.json`, or `default` for a bare weights file (which carries no config)."""
    folder = storage.path(path)
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a transformers DINOv2 folder: no config.json")
        return dinov2_config_from_transformers(json.loads((folder / "config.json").read_text()), **config_overrides)
    storage.check_readable(path, "DINOv2 weights")
    return default.replace(**config_overrides)


def load_dinov2(path: str | Path, cfg: Dinov2Config | None = None, **config_overrides) -> tuple[Dinov2Config, dict]:
    """(config, params) of DINOv2 weights, read tensor by tensor, strictly.

    path: a transformers folder (`config.json` + `model.safetensors`, sharded or `.bin`; its config is
    used, and `cfg` must be None), or one weights file (`.safetensors` or a pickle), whose architecture
    `cfg` must give (e.g. `Dinov2Config.vit_s14()`). config_overrides: Dinov2Config fields (dtype,
    param_dtype, remat, ...). A folder's config names no dtype, so the stored one becomes `param_dtype`
    unless config_overrides set it (as `load_component` does); a `cfg` is honoured as given, its
    `param_dtype` included. Leaves are numpy, in the config's `param_dtype`.
    """
    path = storage.path(path)
    if path.is_dir():
        if cfg is not None:
            raise ValueError(f"{path} is a folder: its config.json gives the architecture, so pass no cfg")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a transformers DINOv2 folder: no config.json")
        state = open_state_dict(component_weights(path, "model"))
        overrides = {"param_dtype": stored_dtype(state)} | config_overrides
        cfg = dinov2_config_from_transformers(json.loads((path / "config.json").read_text()), **overrides)
    else:
        if cfg is None:
            raise ValueError(f"{path} is a weights file without a config: pass cfg (e.g. Dinov2Config.vit_s14())")
        state = open_state_dict(path)
        cfg = cfg.replace(**config_overrides)
    with Prefetch(whole_files(source_files(state))):
        return cfg, dinov2_params_from_transformers(state, cfg)
