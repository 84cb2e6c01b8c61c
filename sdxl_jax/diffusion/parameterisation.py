"""What a network predicts — eps, v or the clean latent — defined once, for sampling and for training.

One noisy latent, in the two coordinates this package uses:

    variance preserving (training; what the model sees)  x_t = alpha x0 + s eps,  alpha = sqrt(ab), s = sqrt(1 - ab)
    sigma space (sampling)                                x = x0 + sigma eps,     sigma = s / alpha,
                                                          x_t = x / sqrt(sigma² + 1) = c_in x
    snr = alpha² / s² = ab / (1 - ab) = 1 / sigma²

    prediction      output              x0 from the output at (x, sigma)         output error² / x0 error²
    "epsilon"       eps                 x - sigma eps                            snr
    "v_prediction"  alpha eps - s x0    x / (sigma² + 1) - sigma c_in v          snr + 1
    "sample"        x0                  the output itself                        1

(`sample` is diffusers' name for a model predicting the clean latent.) Each `Parameterisation` holds
its row: the training target from (x0, eps, alpha, s) (`diffusion/losses.py`), the map output ->
denoised estimate that makes a denoiser of the network (`diffusion/denoisers.py`) and its inverse
(guidance rescale works in the output's space, `diffusion/guidance.py`), and the error ratio that
converts a loss weight on the x0 error into a weight on the output's error (min-SNR and friends).
Every map is written in the form its caller has always computed (float32 arithmetic).
"""

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

Prediction = Literal["epsilon", "v_prediction", "sample"]


def expand_to(value, x: jax.Array) -> jax.Array:
    """A scalar, or a per-example `[B]` value reshaped to broadcast against `x` `[B, ...]` (float32)."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def c_in(sigma) -> jax.Array:
    """alpha in sigma space: `1 / sqrt(sigma² + 1)`."""
    return jax.lax.rsqrt(sigma**2 + 1.0)


def noisy(x0, eps, alpha, s):
    """The variance-preserving noisy latent `alpha x0 + s eps` (the model's input at training time)."""
    return alpha * x0 + s * eps


# ---- the maps, one set per prediction ----------------------------------------------------------------


def eps_to_denoised(x, sigma, eps):
    return x - sigma * eps


def denoised_to_eps(x, sigma, denoised):
    return (x - denoised) / sigma


def v_to_denoised(x, sigma, v):
    return x / (sigma**2 + 1.0) - sigma * c_in(sigma) * v


def denoised_to_v(x, sigma, denoised):
    return (x / (sigma**2 + 1.0) - denoised) / (sigma * c_in(sigma))


def identity_space(x, sigma, denoised):
    """A sample-prediction model's output is the denoised estimate itself."""
    return denoised


@dataclasses.dataclass(frozen=True)
class Parameterisation:
    """One prediction type's row of the table in the module docstring.

    target(x0, eps, alpha, s): the output a perfect model gives at `x_t = alpha x0 + s eps`.
    to_denoised(x, sigma, out) / from_denoised(x, sigma, denoised): output <-> x0 estimate in sigma space.
    error_scale(snr): `(output error)² / (x0 error)²` at fixed x_t; a weight w on the x0 error is
    `w / error_scale(snr)` on the output's error.
    """

    target: Callable
    to_denoised: Callable
    from_denoised: Callable
    error_scale: Callable


PARAMETERISATIONS: dict[str, Parameterisation] = {
    "epsilon": Parameterisation(
        target=lambda x0, eps, alpha, s: eps, to_denoised=eps_to_denoised, from_denoised=denoised_to_eps,
        error_scale=lambda snr: snr),
    "v_prediction": Parameterisation(
        target=lambda x0, eps, alpha, s: alpha * eps - s * x0, to_denoised=v_to_denoised,
        from_denoised=denoised_to_v, error_scale=lambda snr: snr + 1),
    "sample": Parameterisation(
        target=lambda x0, eps, alpha, s: x0, to_denoised=identity_space, from_denoised=identity_space,
        error_scale=lambda snr: 1.0),
}  # fmt: skip


def vp_denoised(out, x_t, alpha, s, prediction: str) -> jax.Array:
    """The x0 estimate from a network output at the variance-preserving `x_t = alpha x0 + s eps` (alpha, s
    `[B]` or scalars): eps `(x_t - s out) / alpha`, v `alpha x_t - s out`, sample `out`. The same x0 as
    `to_denoised` in sigma space where alpha > 0; v and sample stay finite at alpha = 0 (zero terminal SNR)."""
    alpha, s = expand_to(alpha, x_t), expand_to(s, x_t)
    if prediction == "epsilon":
        return (x_t - s * out) / alpha
    if prediction == "v_prediction":
        return alpha * x_t - s * out
    get(prediction)
    return out


def get(prediction: str) -> Parameterisation:
    if prediction not in PARAMETERISATIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[prediction]
