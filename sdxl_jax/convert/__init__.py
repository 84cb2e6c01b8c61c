"""Checkpoint conversion between PyTorch layouts (diffusers, original single-file) and this project."""

from sdxl_jax.convert.files import read_safetensors, read_state_dict
from sdxl_jax.convert.load import load_unet
from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.convert.text_encoder import (
    load_text_encoder,
    text_encoder_config_from_transformers,
    text_encoder_params_from_transformers,
    text_encoder_params_to_transformers,
)
from sdxl_jax.convert.unet import unet_config_from_diffusers, unet_params_from_diffusers, unet_params_to_diffusers

__all__ = [
    "ConversionError",
    "load_text_encoder",
    "load_unet",
    "read_safetensors",
    "read_state_dict",
    "text_encoder_config_from_transformers",
    "text_encoder_params_from_transformers",
    "text_encoder_params_to_transformers",
    "unet_config_from_diffusers",
    "unet_params_from_diffusers",
    "unet_params_to_diffusers",
]
