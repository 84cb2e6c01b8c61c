"""Tiny, structurally complete SDXL pipelines (base and refiner) in diffusers, with random perturbed weights.

Every component has SDXL's structure at toy width: a text_time UNet with depth 0/2 levels and a deep
middle, the 4-level VAE, CLIP-L-like (quick_gelu) and bigG-like (gelu + projection) text encoders,
the real CLIP vocabulary, and SDXL's scheduler config. Test-only (needs torch + diffusers).
"""

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from sdxl_jax.tokenizer import ASSETS_DIR
from tests.helpers.torch_reference import SDXL_SCHEDULER, perturb_

# encoder widths (distinct: diffusers' from_single_file tells them apart by width)
WIDTH_L, WIDTH_G, POOLED = 32, 40, 24
TIME_ID_DIM = 8  # addition_time_embed_dim (256 in SDXL)
SCHEDULER = SDXL_SCHEDULER | {"interpolation_type": "linear"}


def text_encoder(cls, activation: str, seed: int, hidden_size: int | None = None):
    """A perturbed transformers CLIP text model with SDXL's pooling; `hidden_size` default: the pipeline's
    width for this encoder (CLIP-L-like for quick_gelu, bigG-like for gelu)."""
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=hidden_size or (WIDTH_L if activation == "quick_gelu" else WIDTH_G),
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act=activation,
        projection_dim=POOLED,
        bos_token_id=49406,
        eos_token_id=2,
    )  # fmt: skip  (eos_token_id=2: SDXL's configs, pooling at the largest id)
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    return perturb_(cls(config), seed)


def tokenizer(pad_token: str = "<|endoftext|>"):
    vocab, merges = str(ASSETS_DIR / "vocab.json"), str(ASSETS_DIR / "merges.txt")
    return transformers.CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=77)


def unet(refiner: bool, seed: int):
    torch.manual_seed(seed)
    n_ids = 5 if refiner else 6
    model = UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
        cross_attention_dim=WIDTH_G if refiner else WIDTH_L + WIDTH_G, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_DIM,
        projection_class_embeddings_input_dim=POOLED + n_ids * TIME_ID_DIM,
    )  # fmt: skip
    return perturb_(model, seed)


def vae(seed: int):
    torch.manual_seed(seed)
    model = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 32, 64, 64], layers_per_block=2, norm_num_groups=8, latent_channels=4,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    return perturb_(model, seed, scale=0.02)


def base_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae(seed), unet=unet(False, seed + 1), scheduler=EulerDiscreteScheduler(**SCHEDULER),
        text_encoder=text_encoder(transformers.CLIPTextModel, "quick_gelu", seed + 2),
        text_encoder_2=text_encoder(transformers.CLIPTextModelWithProjection, "gelu", seed + 3),
        tokenizer=tokenizer(), tokenizer_2=tokenizer("!"),
    ).to(torch.float32)  # fmt: skip


def refiner_pipeline(seed: int = 10) -> StableDiffusionXLImg2ImgPipeline:
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae(seed), unet=unet(True, seed + 1), scheduler=EulerDiscreteScheduler(**SCHEDULER),
        text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        text_encoder_2=text_encoder(transformers.CLIPTextModelWithProjection, "gelu", seed + 3),
        tokenizer_2=tokenizer("!"),
    ).to(torch.float32)  # fmt: skip
