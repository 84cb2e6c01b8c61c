"""The demo autoencoder: a small KL VAE trained from scratch on the demo's procedural shapes, on a CPU, in minutes.

    python train.py --config configs/demo_vae.py --workdir runs/demo_vae         # reuses runs/demo_shapes/
    python train.py --config configs/demo_vae.py:gan --workdir runs/demo_vae_gan # + the PatchGAN

The same AutoencoderKL as SDXL's, scaled down to three levels (f=4: a 32x32 image is an 8x8x8 latent),
trained from scratch by the autoencoder objective (`train/autoencoder.py`) on the images of
`configs/demo.py`'s dataset (`data.source = "shapes"`, captions ignored) as random 32x32 crops, 1500
steps of 8. LPIPS is off (`perceptual_weight` 0: no pretrained VGG16 exists offline, and on a CPU it
would cost more than the VAE), so the loss is ldm's L1 NLL with its KL term (1e-6). Training decodes
the posterior's mean (`sample_posterior` False; ldm decodes a sample, which here ended 1 dB lower,
29.5 dB). Validation reconstructs 64 held-out images (written from another seed of the same generator:
none is trained on) and reports their mean PSNR and SSIM; the export is an AutoencoderKL folder and an
ldm-layout file. What it reaches and how fast: README, "The autoencoder (first stage)".

Argument: "" (no adversarial term: `disc_factor` 0, the discriminator never runs) or `gan` (taming's
PatchGAN with 32 base channels, hinge loss, switched on half way, at step 750, with ldm's adaptive
weight; both optimisers at the same LR): it stays stable (d_loss 1.00, 30.0 dB) but its discriminator
does not get past chance at this size.
"""

from configs import demo
from sdxl_jax.models import VAEConfig
from sdxl_jax.train.config import skeleton
from sdxl_jax.train.state import Models

STEPS = 1500


def demo_vae() -> VAEConfig:
    """KL-f4 with 8 latent channels (a 32x32 image is 8x8x8: 6x fewer numbers), 32 channels at every
    level, one resnet per encoder level, no mid-block attention (it cost time and gained nothing here); fp32."""
    return VAEConfig(
        block_out_channels=(32, 32, 32), layers_per_block=1, norm_groups=8, latent_channels=8,
        mid_block_attention=False, sample_size=32,
    )  # fmt: skip


def get_config(arg=None):
    if arg not in (None, "", "gan"):
        raise ValueError(f"configs/demo_vae.py takes no argument or 'gan', got {arg!r}")
    data = demo.get_config().data
    data.update(buckets="32x32", caption_dropout=0.0)
    c = skeleton(Models("autoencoder", None, demo_vae(), None, None), data)
    c.mesh.update(data=-1, fsdp=1)
    c.update(num_steps=STEPS, batch_size=8, log_every=100, checkpoint_every=500, seed=0)
    c.optimizer.update(learning_rate=2e-3, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip_norm=0.0,
                       schedule="cosine", warmup_steps=20, decay_steps=STEPS, end_factor=0.05)  # fmt: skip
    c.ema.decay = 0.99
    ae = c.autoencoder
    ae.loss.update(perceptual_weight=0.0, kl_weight=1e-6, disc_factor=0.0)
    ae.sample_posterior = False
    validation = data.copy_and_resolve_references()
    validation.update(path="runs/demo_vae_heldout", random_crop=False, num_images=64, shapes_seed=1)
    c.validation.update(every=STEPS, num_images=64, seed=0, data=validation)
    c.export_on_finish = "diffusers,single_file"
    c.peak_flops_per_device = 1e12  # nominal, for a CPU
    if arg == "gan":
        ae.loss.update(disc_factor=1.0, disc_start=STEPS // 2, disc_weight=0.5)
        ae.discriminator.update(channels=32)
        ae.discriminator_optimizer.update(learning_rate=2e-3, schedule="cosine", warmup_steps=0, decay_steps=STEPS,
                                          end_factor=0.05)  # fmt: skip
    return c
