"""Checkpoint conversion between PyTorch layouts (diffusers, original single-file) and this project."""

from sdxl_jax.convert.load import load_unet, read_safetensors
from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.convert.unet import unet_config_from_diffusers, unet_params_from_diffusers, unet_params_to_diffusers

__all__ = [
    "ConversionError",
    "load_unet",
    "read_safetensors",
    "unet_config_from_diffusers",
    "unet_params_from_diffusers",
    "unet_params_to_diffusers",
]
