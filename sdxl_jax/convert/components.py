"""The table of pipeline components: for each, how the PyTorch tools store it and how it converts.

    COMPONENTS["unet"].params_from_torch(state_dict, cfg)      # diffusers keys -> Flax params, strictly
    load_component("vae", "sdxl/vae")                          # (config, params) of a diffusers folder

`load_diffusers` and the single-file import read every component through this table, the exports
name every PyTorch key through it, and the project format checks every loaded tree against its
`abstract_params`. `load_unet`, `load_vae` and `load_text_encoder` are its entries as functions.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdxl_jax import storage
from sdxl_jax.convert.files import Prefetch, component_weights, open_state_dict, source_files, stored_dtype, whole_files
from sdxl_jax.convert.mapping import KeyFn
from sdxl_jax.convert.text_encoder import (
    text_encoder_config_from_transformers,
    text_encoder_key_fn,
    text_encoder_params_from_transformers,
)
from sdxl_jax.convert.unet import unet_config_from_diffusers, unet_key_fn, unet_params_from_diffusers
from sdxl_jax.convert.vae import vae_config_from_diffusers, vae_key_fn, vae_params_from_diffusers
from sdxl_jax.models import clip, pixel_space, unet
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class Component:
    """One component's PyTorch form (a diffusers sub-folder: `config.json` + `{weights_stem}.safetensors`)
    and its converters. Each callable takes the component's config dataclass where it takes `cfg`."""

    what: str  # what its folder holds, for errors: "diffusers UNet"
    weights_stem: str  # `{stem}[.{variant}].safetensors` (or sharded, or legacy `.bin`)
    config_from_torch: Callable[..., Any]  # (config.json dict, **field overrides) -> cfg
    params_from_torch: Callable[..., Any]  # (state dict, cfg, place=None) -> params, strictly (`torch_to_flax`)
    abstract_params: Callable[[Any], Any]  # cfg -> the boxed `ShapeDtypeStruct` tree
    torch_key: Callable[[Any], KeyFn]  # cfg -> (Flax path, rank) -> (PyTorch key, layout rule); text: prefixed


_TEXT_ENCODER = Component(
    "transformers text-encoder",
    "model",
    text_encoder_config_from_transformers,
    text_encoder_params_from_transformers,
    clip.abstract_params,
    lambda cfg: text_encoder_key_fn(prefixed=True),  # the released files' `text_model.` keys
)
COMPONENTS: dict[str, Component] = {
    "unet": Component(
        "diffusers UNet",
        "diffusion_pytorch_model",
        unet_config_from_diffusers,
        unet_params_from_diffusers,
        unet.abstract_params,
        unet_key_fn,
    ),
    "vae": Component(
        "diffusers VAE",
        "diffusion_pytorch_model",
        vae_config_from_diffusers,
        vae_params_from_diffusers,
        pixel_space.abstract_params,  # a VAE's, or none for pixel space
        lambda cfg: vae_key_fn(),
    ),
    "text_encoder": _TEXT_ENCODER,  # CLIP-L (base only)
    "text_encoder_2": _TEXT_ENCODER,  # OpenCLIP bigG, with its projection
}


def load_component(
    name: str, path: str | Path, variant: str | None = None, placement=None, **config_overrides
) -> tuple[Any, dict]:
    """(config, params) of the diffusers folder of component `name` (a key of COMPONENTS), read tensor by
    tensor.

    The stored dtype becomes the config's `param_dtype` unless config_overrides set it; variant: e.g.
    "fp16" for `*.fp16.safetensors`; placement: a `pipeline_weights.Placement` that puts each tensor
    where it goes as it is read (default: numpy leaves).
    """
    component, folder = COMPONENTS[name], storage.path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a {component.what} folder: no config.json")
    state = open_state_dict(component_weights(folder, component.weights_stem, variant))
    overrides = {"param_dtype": stored_dtype(state)} | config_overrides  # keep the stored dtype unless asked
    cfg = component.config_from_torch(json.loads((folder / "config.json").read_text()), **overrides)
    place = None if placement is None else placement.placer(name, cfg)
    with Prefetch(whole_files(source_files(state))):
        return cfg, component.params_from_torch(state, cfg, place)


def load_unet(path: str | Path, variant: str | None = None, **config_overrides) -> tuple[UNetConfig, dict]:
    """(config, params) of a diffusers `unet/` folder (`config.json` + `diffusion_pytorch_model[.variant].safetensors`,
    sharded or `.bin`). config_overrides: UNetConfig fields (dtype, param_dtype, remat, scan_layers, ...)."""
    return load_component("unet", path, variant, **config_overrides)


def load_vae(path: str | Path, variant: str | None = None, **config_overrides) -> tuple[VAEConfig, dict]:
    """(config, params) of a diffusers `vae/` folder (`config.json` + `diffusion_pytorch_model[.variant].safetensors`,
    sharded or `.bin`). config_overrides: VAEConfig fields (dtype, param_dtype, ...)."""
    return load_component("vae", path, variant, **config_overrides)


def load_text_encoder(path: str | Path, variant: str | None = None, **config_overrides) -> tuple[CLIPTextConfig, dict]:
    """(config, params) of a diffusers `text_encoder/` or `text_encoder_2/` folder: transformers' `config.json`
    and `model[.variant].safetensors` (or sharded, or `.bin`). config_overrides: CLIPTextConfig fields."""
    return load_component("text_encoder", path, variant, **config_overrides)
