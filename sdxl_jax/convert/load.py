"""Per-component loaders for diffusers folders: `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`."""

import json
from pathlib import Path

from sdxl_jax.convert.files import component_weights, read_safetensors, read_state_dict, stored_dtype
from sdxl_jax.convert.unet import unet_config_from_diffusers, unet_params_from_diffusers
from sdxl_jax.models.unet import UNetConfig


def load_unet(path: str | Path, variant: str | None = None, **config_overrides) -> tuple[UNetConfig, dict]:
    """(config, params) of a diffusers `unet/` folder (`config.json` + `diffusion_pytorch_model[.variant].safetensors`,
    sharded or `.bin`).

    config_overrides: UNetConfig fields to set on top (dtype, param_dtype, remat, scan_layers, ...).
    """
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffusers UNet folder: no config.json")
    state = read_state_dict(component_weights(folder, "diffusion_pytorch_model", variant))
    overrides = {"param_dtype": stored_dtype(state)} | config_overrides  # keep the stored dtype unless asked
    cfg = unet_config_from_diffusers(json.loads((folder / "config.json").read_text()), **overrides)
    return cfg, unet_params_from_diffusers(state, cfg)


__all__ = ["load_unet", "read_safetensors"]
