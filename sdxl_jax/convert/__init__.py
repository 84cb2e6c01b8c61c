"""Checkpoint conversion between PyTorch layouts (diffusers, original single-file) and this project.

`components.COMPONENTS` is the table of the pipeline's components (how each is read and converted);
`pipeline_weights` reads whole pipelines through it, `export` writes them back.
"""

from sdxl_jax.convert.components import COMPONENTS, load_text_encoder, load_unet, load_vae
from sdxl_jax.convert.dinov2 import load_dinov2, save_dinov2
from sdxl_jax.convert.export import export_diffusers, export_single_file
from sdxl_jax.convert.files import read_safetensors, read_state_dict
from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.convert.perceptual import load_lpips, load_patch_discriminator, patch_discriminator_to_torch
from sdxl_jax.convert.pipeline_weights import (
    PipelineWeights,
    load_diffusers,
    load_pipeline_weights,
    load_project,
    load_single_file,
    save_project,
)
from sdxl_jax.convert.single_file import (
    SingleFileLayout,
    diffusers_to_single_file,
    iter_single_file_to_diffusers,
    single_file_plan,
    single_file_to_diffusers,
)
from sdxl_jax.convert.single_file_keys import detect_model
from sdxl_jax.convert.text_encoder import (
    text_encoder_config_from_transformers,
    text_encoder_params_from_transformers,
    text_encoder_params_to_transformers,
)
from sdxl_jax.convert.unet import unet_config_from_diffusers, unet_params_from_diffusers, unet_params_to_diffusers
from sdxl_jax.convert.vae import vae_config_from_diffusers, vae_params_from_diffusers, vae_params_to_diffusers

__all__ = [
    "COMPONENTS",
    "ConversionError",
    "PipelineWeights",
    "SingleFileLayout",
    "detect_model",
    "export_diffusers",
    "export_single_file",
    "diffusers_to_single_file",
    "iter_single_file_to_diffusers",
    "load_diffusers",
    "load_dinov2",
    "save_dinov2",
    "load_lpips",
    "load_patch_discriminator",
    "load_pipeline_weights",
    "load_project",
    "load_single_file",
    "load_text_encoder",
    "load_unet",
    "load_vae",
    "patch_discriminator_to_torch",
    "read_safetensors",
    "read_state_dict",
    "save_project",
    "single_file_plan",
    "single_file_to_diffusers",
    "text_encoder_config_from_transformers",
    "text_encoder_params_from_transformers",
    "text_encoder_params_to_transformers",
    "unet_config_from_diffusers",
    "unet_params_from_diffusers",
    "unet_params_to_diffusers",
    "vae_config_from_diffusers",
    "vae_params_from_diffusers",
    "vae_params_to_diffusers",
]
