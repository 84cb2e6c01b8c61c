"""Flax (Linen) models of SDXL."""

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from sdxl_jax.models.unet import UNet, UNetConfig
from sdxl_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, from_latents, to_latents

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "DiagonalGaussian",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "from_latents",
    "to_latents",
]
