"""Weights of the first stage's training losses: LPIPS (torchvision's VGG16 + lpips' heads) and taming's
PatchGAN discriminator, converted strictly (`mapping.torch_to_flax`: every used key consumed once,
every parameter produced once, offenders named).

- `load_lpips(vgg16, heads)`: a torchvision VGG16 state dict (`features.{i}.weight/bias`; the
  classifier's keys, `VGG16_CLASSIFIER_KEYS`, are ignored by name) and lpips' heads file
  (`lpips/weights/v0.1/vgg.pth`, or taming's identical `vgg.pth`: `lin{s}.model.1.weight`) ->
  `Lpips` params; `load_lpips_heads(heads)` the heads alone.
- `load_patch_discriminator(source, cfg)`: a bare `NLayerDiscriminator` state dict (`main.{i}.*`) or an
  ldm/taming autoencoder checkpoint, whose discriminator sits under `loss.discriminator.` (its other
  keys belong to other components and are left alone) -> `{"params", "batch_stats"}`.
  `patch_discriminator_to_torch` is the inverse (a bare state dict).
"""

from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax.linen import meta

from sdxl_jax.convert.files import open_state_dict
from sdxl_jax.convert.mapping import ConversionError, check_tree, flax_to_torch, shape_of, torch_to_flax
from sdxl_jax.convert.torch_layouts import _CONV, _IDENTITY, _NORM_SCALE, LeafRule, kept
from sdxl_jax.models import lpips, patchgan
from sdxl_jax.models.patchgan import PatchDiscriminatorConfig

# torchvision VGG16's classification head (Linear 25088->4096, 4096->4096, 4096->1000): LPIPS reads only
# `features`. A `features` key LPIPS does not use (none exist: the pools have no weights) is an error.
VGG16_CLASSIFIER_KEYS = tuple(f"classifier.{i}.{leaf}" for i in (0, 3, 6) for leaf in ("weight", "bias"))
# Where an ldm / taming autoencoder checkpoint keeps the discriminator.
LDM_DISCRIMINATOR_PREFIX = "loss.discriminator."
# torch BatchNorm's step counter (only used with momentum=None, which taming does not set).
DISCRIMINATOR_IGNORABLE = ("num_batches_tracked",)

_LEAF_RULES = {"bias": _IDENTITY, "scale": _NORM_SCALE, "kernel": _CONV, "mean": kept("running_mean"),
               "var": kept("running_var")}  # fmt: skip

Source = str | Path | Mapping[str, np.ndarray]


def _rule(path: tuple[str, ...]) -> LeafRule:
    if path[-1] not in _LEAF_RULES:
        raise KeyError(f"no layout rule for parameter {'/'.join(path)}")
    return _LEAF_RULES[path[-1]]


def _state(source: Source) -> Mapping[str, np.ndarray]:
    return source if isinstance(source, Mapping) else open_state_dict(source)


class _Renamed(Mapping):
    """Some tensors of a state dict under new names (`names`: new -> old), still lazy: a tensor is read
    when asked for, its shape taken from the file's header."""

    def __init__(self, state: Mapping, names: dict[str, str]):
        self._state, self._names = state, names

    def __getitem__(self, key: str) -> np.ndarray:
        return self._state[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self._state, self._names[key])


# LPIPS: torchvision's VGG16 `features` + lpips' heads


def vgg16_key(path: tuple[str, ...], ndim: int) -> tuple[str, LeafRule]:
    """('features_10', 'kernel') -> ('features.10.weight', conv rule)."""
    rule = _rule(path)
    return f"{path[0].replace('_', '.')}.{rule[0]}", rule


def lpips_head_key(path: tuple[str, ...], ndim: int) -> tuple[str, LeafRule]:
    """('lin3', 'kernel') -> ('lin3.model.1.weight', conv rule): index 1 after the heads' Dropout."""
    rule = _rule(path)
    return f"{path[0]}.model.1.{rule[0]}", rule


def lpips_params_from_torch(vgg16: Mapping[str, np.ndarray], heads: Mapping[str, np.ndarray]):
    """`Lpips` params (fp32 numpy) from a torchvision VGG16 state dict and lpips' heads state dict."""
    target = meta.unbox(lpips.abstract_params())
    head_tree = {name: tree for name, tree in target.items() if name != "vgg"}
    features = _Renamed(vgg16, {key: key for key in vgg16 if key not in VGG16_CLASSIFIER_KEYS})
    trunk = torch_to_flax(features, target["vgg"], vgg16_key, ignorable=(), what="torchvision VGG16 state dict")
    return {"vgg": trunk} | torch_to_flax(heads, head_tree, lpips_head_key, ignorable=(), what="LPIPS heads state dict")


def load_lpips(vgg16_path: str | Path, heads_path: str | Path):
    """`Lpips` params from torchvision's VGG16 weights (e.g. `vgg16-397923af.pth`, or a safetensors
    file of the same keys) and lpips' heads file (`lpips/weights/v0.1/vgg.pth`)."""
    return lpips_params_from_torch(open_state_dict(vgg16_path), open_state_dict(heads_path))


def load_lpips_heads(heads_path: str | Path):
    """The five heads alone (`{"lin0": ..., ..., "lin4": ...}` of `Lpips` params) from lpips' heads file:
    what a random VGG16 trunk is paired with when no VGG16 weights are at hand."""
    target = {name: tree for name, tree in meta.unbox(lpips.abstract_params()).items() if name != "vgg"}
    heads = open_state_dict(heads_path)
    return torch_to_flax(heads, target, lpips_head_key, ignorable=(), what="LPIPS heads state dict")


# The PatchGAN discriminator: taming's NLayerDiscriminator


def discriminator_torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, LeafRule]:
    """(collection, module, leaf) -> taming's `main.{index}.{leaf}`: conv_0 is main.0; conv_k (k >= 1)
    is main.{3k - 1} and norm_k main.{3k} (each conv after the first is followed by a BatchNorm and a
    LeakyReLU; the output conv, conv_{n_layers + 1}, follows the same count).

    ('params', 'conv_2', 'kernel') -> 'main.5.weight'; ('batch_stats', 'norm_1', 'var') -> 'main.3.running_var'
    """
    kind, k = path[1].rsplit("_", 1)
    index = {"conv": 3 * int(k) - 1 if int(k) else 0, "norm": 3 * int(k)}[kind]
    rule = _rule(path)
    return f"main.{index}.{rule[0]}", rule


def discriminator_state(state: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """The bare `NLayerDiscriminator` state dict (`main.*`) in `state`: itself, or the keys under
    `loss.discriminator.` of an ldm / taming autoencoder checkpoint, the prefix removed."""
    if any(key.startswith(LDM_DISCRIMINATOR_PREFIX) for key in state):
        prefix = LDM_DISCRIMINATOR_PREFIX
        return _Renamed(state, {key.removeprefix(prefix): key for key in state if key.startswith(prefix)})
    if not any(key.startswith("main.") for key in state):
        found = sorted({key.split(".")[0] for key in state})[:10]
        raise ConversionError(
            f"no discriminator weights: expected keys main.* (an NLayerDiscriminator state dict) or "
            f"{LDM_DISCRIMINATOR_PREFIX}main.* (an ldm/taming autoencoder checkpoint); top-level names found: {found}"
        )
    return state


def load_patch_discriminator(source: Source, cfg: PatchDiscriminatorConfig | None = None):
    """`{"params": ..., "batch_stats": ...}` (numpy, `cfg.param_dtype`; running averages fp32) of a
    `PatchDiscriminator(cfg)` (default: taming's) from a state dict or a weights file (.pth / .ckpt /
    .safetensors), bare or an ldm autoencoder checkpoint. BatchNorm's `num_batches_tracked` is ignored."""
    cfg = cfg or PatchDiscriminatorConfig()
    target = meta.unbox(patchgan.abstract_variables(cfg))  # batch_stats are fp32 whatever the param_dtype
    state = discriminator_state(_state(source))
    what = "PatchGAN discriminator state dict"
    return torch_to_flax(state, target, discriminator_torch_key, ignorable=DISCRIMINATOR_IGNORABLE, what=what)


def patch_discriminator_to_torch(variables, cfg: PatchDiscriminatorConfig | None = None) -> dict[str, np.ndarray]:
    """taming's bare `NLayerDiscriminator` state dict (`main.*`, without `num_batches_tracked`) from
    `{"params", "batch_stats"}`: the inverse of `load_patch_discriminator`."""
    cfg = cfg or PatchDiscriminatorConfig()
    variables = jax.tree.map(np.asarray, meta.unbox(dict(variables)))
    check_tree("PatchGAN discriminator variables do not match the config", variables, patchgan.abstract_variables(cfg))
    return flax_to_torch(variables, discriminator_torch_key)
