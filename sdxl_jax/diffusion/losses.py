"""Training objective of a discrete DDPM model: noised inputs, eps / v targets, per-timestep weights.

Targets: eps, v, or the clean latent itself ("sample", diffusers' name), each prediction's as
`parameterisation.py` defines it (the sampler's denoisers read the same table). Training works in the
variance-preserving form the model sees, `x_t = sqrt(ab) x0 + sqrt(1 - ab) noise`
with `ab = alphas_cumprod[t]` (the same input as sigma space's `(x0 + sigma noise) / sqrt(sigma² + 1)`),
`snr = ab / (1 - ab) = 1 / sigma²`.

Weights (multiply the per-example MSE):
    "none"       1
    "min_snr"    Min-SNR-gamma (Hang et al. 2023): min(snr, gamma) on the x0 error (the paper's x0 form),
                 so min(snr, gamma) / snr for eps, / (snr + 1) for v (`Parameterisation.error_scale`)
    "debiased"   debiased estimation (Yu et al. 2024): 1 / sqrt(snr), snr clipped at 1000; sqrt(snr) for
                 sample (the same weight on the equivalent eps error, since eps error² = snr x0 error²)
    "min_snr_v"  the v-MSE with its x0 weight clipped: v error² = (snr + 1) x0 error², so min(snr + 1,
                 gamma) for sample, that / (snr + 1) for v, / snr for eps. Unlike min_snr's x0 form it
                 keeps weight 1 at snr -> 0, the pure-noise step that zero terminal SNR samples from.

Timesteps (`sample_timesteps`): uniform integers, or with `shift` > 1 moved toward high noise the
way SD3 shifts its schedule for larger images: u ~ U[0, 1), u -> shift u / (1 + (shift - 1) u).
"""

from typing import Literal

import jax
import jax.numpy as jnp

from sdxl_jax.diffusion import parameterisation
from sdxl_jax.diffusion.parameterisation import Prediction, expand_to

Weighting = Literal["none", "min_snr", "debiased", "min_snr_v"]
WEIGHTINGS = ("none", "min_snr", "debiased", "min_snr_v")
DEBIASED_MAX_SNR = 1000.0


def noisy_latents(x0, noise, alphas_cumprod_t):
    """The model input at timesteps with alphabar `alphas_cumprod_t` `[B]`."""
    ab = expand_to(alphas_cumprod_t, x0)
    return parameterisation.noisy(x0, noise, jnp.sqrt(ab), jnp.sqrt(1 - ab))


def target(x0, noise, alphas_cumprod_t, prediction: Prediction):
    """eps: the noise; v: sqrt(ab) noise - sqrt(1 - ab) x0; sample: x0."""
    ab = expand_to(alphas_cumprod_t, x0)
    return parameterisation.get(prediction).target(x0, noise, jnp.sqrt(ab), jnp.sqrt(1 - ab))


def snr(alphas_cumprod_t):
    ab = jnp.asarray(alphas_cumprod_t, jnp.float32)
    return ab / (1 - ab)


def _from_x0_weight(x0_weight, snr_t, prediction: Prediction):
    """The weight on a prediction's own error that puts `x0_weight` on the x0 error
    (eps error² = snr x0 error², v error² = (snr + 1) x0 error²)."""
    return x0_weight / parameterisation.get(prediction).error_scale(snr_t)


def loss_weights(snr_t, weighting: Weighting, prediction: Prediction, gamma: float = 5.0) -> jax.Array:
    snr_t = jnp.asarray(snr_t, jnp.float32)
    if weighting == "none":
        return jnp.ones_like(snr_t)
    if weighting == "min_snr":
        return _from_x0_weight(jnp.minimum(snr_t, gamma), snr_t, prediction)
    if weighting == "min_snr_v":
        return _from_x0_weight(jnp.minimum(snr_t + 1, gamma), snr_t, prediction)
    if weighting == "debiased":
        clipped = jnp.minimum(snr_t, DEBIASED_MAX_SNR)
        return jnp.sqrt(clipped) if prediction == "sample" else jax.lax.rsqrt(clipped)
    raise ValueError(f"unknown loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def sample_timesteps(key, batch: int, t_min: int, t_max: int, shift: float = 1.0) -> jax.Array:
    """Training timesteps int32 `[batch]` in [t_min, t_max): uniform, or shifted toward t_max.

    shift 1: `randint` (the draws of every run before the shift existed). shift s > 1: u ~ U[0, 1),
    u' = s u / (1 + (s - 1) u), t = t_min + floor(u' (t_max - t_min)); P(u' >= 1/2) = s / (s + 1).
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    if shift == 1.0:
        return jax.random.randint(key, (batch,), t_min, t_max)
    u = jax.random.uniform(key, (batch,), jnp.float32)
    shifted = shift * u / (1 + (shift - 1) * u)
    return jnp.minimum(t_min + jnp.floor(shifted * (t_max - t_min)).astype(jnp.int32), t_max - 1)


def diffusion_loss(prediction_out, target_out, weights=None) -> jax.Array:
    """Mean over the batch of the (weighted) per-example mean squared error, in float32."""
    err = (prediction_out.astype(jnp.float32) - target_out.astype(jnp.float32)) ** 2
    per_example = err.reshape(err.shape[0], -1).mean(axis=1)
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()
