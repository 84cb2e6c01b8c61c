"""Flax (Linen) models of SDXL."""

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from sdxl_jax.models.unet import UNet, UNetConfig

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "UNet", "UNetConfig"]
