"""Denoisers: a network's raw output turned into an estimate of the clean latent, in sigma space.

A *model function* is `model(x_in, t, cond) -> output` (the UNet with its parameters bound: `x_in` the
scaled latent `[B, ...]`, `t` the timestep `[B]`, `cond` whatever the UNet consumes besides).
A *denoiser* is `denoise(x, sigma, t, cond) -> denoised` with `x = x0 + sigma * eps`. `sigma` and `t`
are scalars or `[B]`; the timestep is passed along from the schedule rather than re-derived from sigma
(diffusers feeds fractional timesteps that are not a function of sigma alone).

Preconditioning (k-diffusion / EDM form for a discrete DDPM model), `c_in = 1 / sqrt(sigma² + 1)`:
    eps:  denoised = x - sigma * eps(c_in x, t)
    v:    denoised = c_skip x + c_out v(c_in x, t),  c_skip = 1 / (sigma² + 1),  c_out = -sigma / sqrt(sigma² + 1)
    sample (x0): denoised = x0(c_in x, t)   (diffusers' prediction_type="sample"; the demo model's: a
          tiny network never has to reproduce the noise exactly, so it leaves none in the image)
The arithmetic is float32 whatever the model's compute dtype.
"""

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
Denoiser = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]
Prediction = Literal["epsilon", "v_prediction", "sample"]


def expand_to(value, x: jax.Array) -> jax.Array:
    """A scalar, or a per-example `[B]` value reshaped to broadcast against `x` `[B, ...]` (float32)."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def batch_timesteps(t, batch: int) -> jax.Array:
    """The model's timestep as float32 `[B]`."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))


def c_in(sigma) -> jax.Array:
    return jax.lax.rsqrt(sigma**2 + 1.0)


def scale_input(x, sigma) -> jax.Array:
    """The model's input `x / sqrt(sigma² + 1)` (diffusers' `scale_model_input`; unit variance for unit data)."""
    return x / jnp.sqrt(sigma**2 + 1.0)


# Each parameterisation's output <-> denoised, at (x, sigma); guidance rescale works in these spaces.
def denoised_to_eps(x, sigma, denoised):
    return (x - denoised) / sigma


def eps_to_denoised(x, sigma, eps):
    return x - sigma * eps


def denoised_to_v(x, sigma, denoised):
    return (x / (sigma**2 + 1.0) - denoised) / (sigma * c_in(sigma))


def v_to_denoised(x, sigma, v):
    return x / (sigma**2 + 1.0) - sigma * c_in(sigma) * v


def identity_space(x, sigma, denoised):
    """A sample-prediction model's output is the denoised estimate itself."""
    return denoised


# prediction -> (denoised -> model output, model output -> denoised), both at (x, sigma)
TO_OUTPUT = {"epsilon": denoised_to_eps, "v_prediction": denoised_to_v, "sample": identity_space}
FROM_OUTPUT = {"epsilon": eps_to_denoised, "v_prediction": v_to_denoised, "sample": identity_space}


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
    if prediction not in FROM_OUTPUT:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(FROM_OUTPUT)}")
    return _denoiser(model, FROM_OUTPUT[prediction])
