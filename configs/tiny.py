"""A tiny SDXL-shaped pipeline trained on synthetic data: tests and CPU smoke runs, seconds per step.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
    python train.py --config configs/tiny.py:refiner --workdir /tmp/tiny_refiner   # bigG only, t < 200
    python train.py --config configs/tiny.py:latents --workdir /tmp/tiny_latents   # cached latents + text
    python train.py --config configs/tiny.py:folder --workdir /tmp/tiny_folder \
        --config.data.path=/data/images                                            # the grain loader, 32² crops
    python train.py --config configs/tiny.py:lora --workdir /tmp/tiny_lora         # LoRA adapters (rank 4)
    python train.py --config configs/tiny.py:autoencoder --workdir /tmp/tiny_vae   # the VAE alone, GAN on
    python train.py --config configs/tiny.py:add --workdir /tmp/tiny_add           # ADD: a few-step student

Argument: comma-separated switches, `refiner`, `latents` (synthetic data either way), `folder`, `lora`
(adapters on the UNet's transformers and every text encoder, exported as a kohya LoRA file) or
`autoencoder` (the tiny VAE trained by the autoencoder objective, with a narrow PatchGAN switched on at
step 3 and LPIPS on a random VGG16; validation reconstructs 4 synthetic images; exports an
AutoencoderKL folder and an ldm-layout file) or `add` (adversarial diffusion distillation of the tiny
UNet into itself: teacher CFG 1-3, heads on the teacher's two encoder levels and middle block).
"""

import ml_collections

from sdxl_jax.data.loader import default_data_config
from sdxl_jax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdxl_jax.train.config import skeleton
from sdxl_jax.train.state import BASE_TIME_IDS, REFINER_TIME_IDS, Models

WIDTH_L, WIDTH_G, POOLED, TIME_ID_DIM = 16, 32, 16, 4


def tiny_models(refiner: bool) -> Models:
    clip = dict(vocab_size=49408, max_position_embeddings=77, intermediate_size=32, num_layers=2, num_heads=2)
    text_l = None if refiner else CLIPTextConfig.tiny(hidden_size=WIDTH_L, **clip)
    text_g = CLIPTextConfig.tiny(hidden_size=WIDTH_G, activation="gelu", projection_dim=POOLED, **clip)
    n_ids = REFINER_TIME_IDS if refiner else BASE_TIME_IDS
    unet = UNetConfig.tiny(
        channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1, num_res_blocks=1,
        context_dim=WIDTH_G + (0 if refiner else WIDTH_L), adm_in_channels=POOLED + n_ids * TIME_ID_DIM,
        time_id_embed_dim=TIME_ID_DIM,
    )  # fmt: skip
    vae = tiny_vae()
    return Models("refiner" if refiner else "base", unet, vae, text_l, text_g)


def tiny_vae() -> VAEConfig:
    return VAEConfig.tiny(block_out_channels=(8, 8, 16, 16), layers_per_block=1)


def autoencoder_config(switches: set) -> ml_collections.ConfigDict:
    """The tiny VAE alone, with every part of ldm's loss on from step 3 (`disc_start` 2: batches 0, 1
    without the adversarial terms)."""
    if switches != {"autoencoder"}:
        raise ValueError(f"autoencoder takes no other switch, got {sorted(switches)}")
    data = ml_collections.ConfigDict({
        "source": "synthetic", "num_examples": 32, "buckets": ((32, 32), (32, 48)), "caption_dropout": 0.0,
        "cached_latents": False, "context_dim": 8, "pooled_dim": 8,
    })  # fmt: skip
    c = skeleton(Models("autoencoder", None, tiny_vae(), None, None), data)
    c.update(num_steps=4, batch_size=4, log_every=1, checkpoint_every=2)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=0, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip_norm=0.0)
    c.ema.decay = 0.99
    ae = c.autoencoder
    ae.loss.update(disc_start=2, perceptual_weight=1.0)
    ae.lpips_random_vgg = True
    ae.discriminator.update(channels=8)
    ae.discriminator_optimizer.learning_rate = 1e-3
    validation = ml_collections.ConfigDict(dict(data) | {"buckets": ((32, 32),), "num_examples": 4})
    c.validation.update(every=4, num_images=4, data=validation)
    c.export_on_finish = "diffusers,single_file"
    c.peak_flops_per_device = 1e12
    return c


def get_config(arg=None):
    switches = set(filter(None, (arg or "").split(",")))
    known = ("refiner", "latents", "folder", "lora", "autoencoder", "add")
    if unknown := switches - set(known):
        raise ValueError(f"unknown switches {sorted(unknown)}; known: {', '.join(known)}")
    if "autoencoder" in switches:
        return autoencoder_config(switches)
    refiner = "refiner" in switches
    models = tiny_models(refiner)
    data = ml_collections.ConfigDict({
        "source": "synthetic", "num_examples": 32, "buckets": ((32, 32), (32, 48)), "caption_dropout": 0.1,
        "cached_latents": "latents" in switches, "context_dim": models.unet.context_dim, "pooled_dim": POOLED,
    })  # fmt: skip
    if "folder" in switches:
        data = default_data_config()
        data.update(buckets="area=32,step=16,min=32,max=32", num_workers=0)
    c = skeleton(models, data)
    c.num_steps = 4
    c.batch_size = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.ema.decay = 0.99
    if refiner:
        c.diffusion.t_max = 200
    c.validation.update(
        every=0,
        prompts=("a red circle on a blue background", "a green square"),
        steps=4,
        height=32,
        width=32,
        guidance_scale=3.0,
    )
    c.peak_flops_per_device = 1e12  # nominal, for a CPU
    if "lora" in switches:
        text = "text_encoder_2" if refiner else "text_encoder,text_encoder_2"
        c.lora.update(rank=4, alpha=2.0, text_encoders=text)
        c.export_on_finish = "lora"
    if "add" in switches:
        c.objective = "add"
        c.distillation.update(
            guidance_min=1.0, guidance_max=3.0, feature_names="down_blocks_0,down_blocks_1,mid_block", c_dim=8,
            kernel_size=3,
        )  # fmt: skip
    return c
