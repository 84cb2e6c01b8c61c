"""Denoisers: a network's raw output turned into an estimate of the clean latent, in sigma space.

A *model function* is `model(x_in, t, cond) -> output` (the UNet with its parameters bound: `x_in` the
scaled latent `[B, ...]`, `t` the timestep `[B]`, `cond` whatever the UNet consumes besides).
A *denoiser* is `denoise(x, sigma, t, cond) -> denoised` with `x = x0 + sigma * eps`. `sigma` and `t`
are scalars or `[B]`; the timestep is passed along from the schedule rather than re-derived from sigma
(diffusers feeds fractional timesteps that are not a function of sigma alone).

Preconditioning (k-diffusion / EDM form for a discrete DDPM model): the network sees `c_in x` with
`c_in = 1 / sqrt(sigma² + 1)`, and its output becomes the denoised estimate by its prediction type's map
(`parameterisation.py`, shared with the training targets):
    eps:  denoised = x - sigma * eps(c_in x, t)
    v:    denoised = c_skip x + c_out v(c_in x, t),  c_skip = 1 / (sigma² + 1),  c_out = -sigma / sqrt(sigma² + 1)
    sample (x0): denoised = x0(c_in x, t)   (diffusers' prediction_type="sample"; the demo model's: a
          tiny network never has to reproduce the noise exactly, so it leaves none in the image)
The arithmetic is float32 whatever the model's compute dtype.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sdxl_jax.diffusion import parameterisation
from sdxl_jax.diffusion.parameterisation import (  # noqa: F401  (this module's interface since before)
    Prediction,
    c_in,
    denoised_to_eps,
    denoised_to_v,
    eps_to_denoised,
    expand_to,
    identity_space,
    v_to_denoised,
)

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
Denoiser = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


def batch_timesteps(t, batch: int) -> jax.Array:
    """The model's timestep as float32 `[B]`."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))


def scale_input(x, sigma) -> jax.Array:
    """The model's input `x / sqrt(sigma² + 1)` (diffusers' `scale_model_input`; unit variance for unit data)."""
    return x / jnp.sqrt(sigma**2 + 1.0)


# prediction -> (denoised -> model output, model output -> denoised), both at (x, sigma); guidance
# rescale works in these spaces (see `parameterisation`).
TO_OUTPUT = {name: p.from_denoised for name, p in parameterisation.PARAMETERISATIONS.items()}
FROM_OUTPUT = {name: p.to_denoised for name, p in parameterisation.PARAMETERISATIONS.items()}


def _denoiser(model: ModelFn, from_output) -> Denoiser:
    def denoise(x, sigma, t, cond):
        x = x.astype(jnp.float32)
        s = expand_to(sigma, x)
        out = model(scale_input(x, s), batch_timesteps(t, x.shape[0]), cond).astype(jnp.float32)
        return from_output(x, s, out)

    return denoise


def eps_denoiser(model: ModelFn) -> Denoiser:
    """Denoiser of an epsilon-prediction model (SDXL base and refiner)."""
    return _denoiser(model, eps_to_denoised)


def make_denoiser(model: ModelFn, prediction: Prediction) -> Denoiser:
    """Denoiser of a model predicting eps, v (v = alpha * eps - sigma_vp * x0) or the clean latent."""
    return _denoiser(model, parameterisation.get(prediction).to_denoised)
