"""The diffusion objective of the train step: a batch -> clean latents and conditioning -> the weighted loss.

    x0, cond = encode_batch(models, params, batch, key)     # batch: the data contract (data/synthetic.py)
    loss, aux = diffusion_loss(unet_fn, config.diffusion, x0, cond, key)

images uint8 `[B, H, W, 3]` (or cached latent moments) -> latents x0 `[B, h, w, C]`; token ids (or cached
context `[B, 77, D]` and pooled text) -> context and the vector conditioning y `[B, adm]`; then noise,
timesteps t ~ U[t_min, t_max) (shifted by `timestep_shift`), x_t, the UNet's prediction, and the MSE
against the prediction's target, weighted per example (`diffusion.losses`).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdxl_jax import conditioning
from sdxl_jax.diffusion import losses, schedules
from sdxl_jax.models import DiagonalGaussian, to_latents
from sdxl_jax.models.pixel_space import first_stage
from sdxl_jax.tokenizer import TokenPair
from sdxl_jax.train.state import Models


def alphas_cumprod(diffusion: ml_collections.ConfigDict) -> np.ndarray:
    """SDXL's training table alphabar[t], float32 `[1000]`."""
    return schedules.scaled_linear_table(zero_terminal_snr=diffusion.zero_terminal_snr).alphas_cumprod.astype(
        np.float32
    )


def time_ids(models: Models, batch: dict) -> jax.Array:
    """Micro-conditioning `[B, 6]` (base) or `[B, 5]` (refiner) from the batch's sizes, crops, scores."""
    b = batch["original_size"].shape[0]
    if models.kind == "refiner":
        return conditioning.refiner_time_ids(
            batch["original_size"], batch["crop_top_left"], batch["aesthetic_score"], b
        )
    return conditioning.base_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"], b)


def encode_batch(
    models: Models, params: dict, batch: dict, key: jax.Array
) -> tuple[jax.Array, conditioning.Conditioning]:
    """(latents x0 fp32 `[B, H/8, W/8, C]`, conditioning) for a batch of images or cached latents.

    images uint8 `[B, H, W, 3]` -> [-1, 1] -> VAE posterior -> a sample (key) -> x scaling factor;
    latent_moments `[B, H/8, W/8, 2C]` skip the encoder. Text goes through the text encoders, or comes
    cached as `context`/`pooled`; `drop_text` zeroes both text parts of those examples.
    """
    if "latent_moments" in batch:
        posterior = DiagonalGaussian.from_moments(batch["latent_moments"])
    else:
        images = batch["images"].astype(jnp.float32) / 127.5 - 1.0
        posterior = first_stage(models.vae).apply({"params": params["vae"]}, images, method="encode")
    x0 = to_latents(posterior.sample(key), models.vae)
    if "context" in batch:
        context, pooled = batch["context"], batch["pooled"]
    else:
        tokens = TokenPair(batch["ids_l"], batch["ids_g"], batch["eot_l"], batch["eot_g"])
        context, pooled = conditioning.encode_text(models.encoders(params), tokens)
    context, pooled = conditioning.drop_text(context, pooled, batch["drop_text"])
    y = conditioning.vector_conditioning(pooled, time_ids(models, batch), models.unet.time_id_embed_dim)
    return x0, conditioning.Conditioning(context, y)


def diffusion_loss(model, diffusion: ml_collections.ConfigDict, x0, cond, key) -> tuple[jax.Array, dict]:
    """The weighted MSE of one batch: (loss, {"t", "noise", "weights": per example}).

    model(x_t, t, cond) -> eps, v or x0, `[B, h, w, C]`; noise = N(0, 1) + offset_noise * N(0, 1) per
    (example, channel); t integers in [t_min, t_max); x_t = sqrt(ab) x0 + sqrt(1 - ab) noise;
    target eps, v or x0; weights per `diffusion.weighting` (see `losses.loss_weights`); t shifted toward
    high noise by `diffusion.timestep_shift` (`losses.sample_timesteps`).
    """
    k_noise, k_offset, k_t = jax.random.split(key, 3)
    b, c = x0.shape[0], x0.shape[-1]
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    if diffusion.offset_noise:
        noise = noise + diffusion.offset_noise * jax.random.normal(k_offset, (b, 1, 1, c), jnp.float32)
    t = losses.sample_timesteps(k_t, b, diffusion.t_min, diffusion.t_max, diffusion.timestep_shift)
    ab = jnp.asarray(alphas_cumprod(diffusion))[t]
    out = model(losses.noisy_latents(x0, noise, ab), t, cond)
    weights = losses.loss_weights(losses.snr(ab), diffusion.weighting, diffusion.prediction, diffusion.min_snr_gamma)
    loss = losses.diffusion_loss(out, losses.target(x0, noise, ab, diffusion.prediction), weights)
    return loss, {"t": t, "noise": noise, "weights": weights}
