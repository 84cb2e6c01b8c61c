"""Flax (Linen) models of SDXL."""

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from sdxl_jax.models.dinov2 import Dinov2Config, Dinov2Model, Dinov2Output
from sdxl_jax.models.lpips import Lpips
from sdxl_jax.models.patchgan import PatchDiscriminator, PatchDiscriminatorConfig
from sdxl_jax.models.unet import UNet, UNetConfig
from sdxl_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, from_latents, to_latents

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "DiagonalGaussian",
    "Dinov2Config",
    "Dinov2Model",
    "Dinov2Output",
    "Lpips",
    "PatchDiscriminator",
    "PatchDiscriminatorConfig",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "from_latents",
    "to_latents",
]
