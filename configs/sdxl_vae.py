"""The SDXL VAE (KL-f8) trained as SDXL's paper retrained LDM's first stage: 256² crops, batch 256, EMA.

    python train.py --config configs/sdxl_vae.py --workdir gs://bucket/sdxl_vae \
        --config.data.path=gs://bucket/images --config.validation.data.path=gs://bucket/val_images \
        --config.autoencoder.lpips_vgg16=/weights/vgg16-397923af.pth \
        --config.autoencoder.lpips_heads=/weights/lpips_vgg_v0.1.pth
    python train.py --config configs/sdxl_vae.py:finetune --workdir runs/vae_ft \
        --config.init_from=/weights/sdxl_vae.safetensors ...            # from the released SDXL VAE
    python train.py --config configs/sdxl_vae.py:decoder_only --workdir runs/vae_dec ...
    python -m sdxl_jax.plan --config configs/sdxl_vae.py --target cpu:8  # the step's memory per device

The objective is ldm's `LPIPSWithDiscriminator` for its KL-f8 autoencoder (`autoencoder_kl_32x32x4`):
L1 + LPIPS (weight 1) as a Gaussian NLL with a fixed log-variance, KL weight 1e-6, taming's PatchGAN
(3 layers, 64 channels, hinge loss) with the adaptive weight times 0.5 from step 50,001 on; one
autoencoder and one discriminator step per batch (`train/autoencoder.py`). Both optimisers are ldm's
Adam (betas 0.5, 0.9, no weight decay, no clipping) at its learning rate rule, base 4.5e-6 times the
batch (1.152e-3 at 256). SDXL's changes: batch 256 (ldm's was 9 to 12) and an EMA of the weights (0.9999;
exported). Data: the grain loader's images in one 256x256 bucket (resized to cover it, random crops),
spread over every device (`mesh.fsdp = -1`: FSDP over the whole pod).

LPIPS needs torchvision's VGG16 weights (`vgg16-397923af.pth`) and lpips' heads (`weights/v0.1/vgg.pth`
in the `lpips` package); the paths below are placeholders to override, and the run stops at once if
they are missing. Validation reconstructs 16 images of `validation.data` every 5000 steps (PSNR, SSIM).

Argument (comma-separated): "" (from scratch: random init, as SDXL retrained it), `finetune` (init from
`init_from`, a converted or released SDXL VAE: a diffusers AutoencoderKL folder, a pipeline folder or an
ldm-layout file; placeholder path below), `decoder_only` (implies finetune; the encoder, so the latent
space, stays fixed: safe for a UNet already trained on it).
"""

import ml_collections

from sdxl_jax.data.loader import default_data_config
from sdxl_jax.models import VAEConfig
from sdxl_jax.train.config import skeleton
from sdxl_jax.train.state import Models

BATCH = 256
LDM_BASE_LR = 4.5e-6  # ldm's base_learning_rate; its trainer multiplies it by the batch size
LPIPS_VGG16 = "weights/vgg16-397923af.pth"  # torchvision's VGG16
LPIPS_HEADS = "weights/lpips_vgg_v0.1.pth"  # lpips/weights/v0.1/vgg.pth
SDXL_VAE = "weights/sdxl_vae.safetensors"  # Stability's released SDXL VAE (ldm layout)


def images(buckets: str, path: str = "") -> ml_collections.ConfigDict:
    """The grain loader on an image folder (`path`) in `buckets`; no captions needed, no flips."""
    c = default_data_config()
    c.update(path=path, buckets=buckets, caption_dropout=0.0, flip_prob=0.0)
    return c


def get_config(arg=None):
    switches = set(filter(None, (arg or "").split(",")))
    if unknown := switches - {"finetune", "decoder_only"}:
        raise ValueError(f"unknown switches {sorted(unknown)}; known: finetune, decoder_only")
    c = skeleton(Models("autoencoder", None, VAEConfig.sdxl(), None, None), images("256x256"))
    c.activation_constraints = True
    c.mesh.update(data=1, fsdp=-1)
    c.update(num_steps=500_000, batch_size=BATCH, log_every=50, checkpoint_every=2000)
    lr = LDM_BASE_LR * BATCH
    c.optimizer.update(learning_rate=lr, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip_norm=0.0, schedule="constant")
    c.ema.update(decay=0.9999, warmup=True)
    ae = c.autoencoder
    ae.loss.update(perceptual_weight=1.0, kl_weight=1e-6, disc_weight=0.5, disc_start=50001)
    ae.update(lpips_vgg16=LPIPS_VGG16, lpips_heads=LPIPS_HEADS)
    ae.discriminator_optimizer.learning_rate = lr
    val = images("256x256")
    val.update(random_crop=False, num_workers=0)
    c.validation.update(every=5000, num_images=16, data=val)
    c.export_on_finish = "diffusers,single_file"
    if switches:  # fine-tuning a trained VAE
        c.init_from = SDXL_VAE
        ae.decoder_only = "decoder_only" in switches
    return c
