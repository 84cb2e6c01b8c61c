"""Flax (Linen) models of SDXL."""

from sdxl_jax.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
