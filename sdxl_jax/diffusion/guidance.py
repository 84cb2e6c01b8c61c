"""Classifier-free guidance: a wrapper that takes a denoiser and returns a denoiser.

The guided denoiser's `cond` is a `Guided(cond, uncond, scale, rescale)`. The unconditional and
conditional halves run as ONE model call on a doubled batch (`[uncond; cond]`, diffusers' order), and
are combined as `uncond + scale * (cond - uncond)`. That is the same on the denoised estimate as on
eps or v (the parameterisation is affine in the model output with the same x for both halves).

`scale` and `rescale` are traced values: changing them never recompiles. Whether the uncond half runs
at all changes shapes, so it is a static Python decision: `use_cfg` (diffusers runs it iff scale > 1;
see `uses_cfg`). Without CFG the wrapper calls the denoiser on `cond` alone and ignores the scale.

Guidance rescale (Lin et al. 2023 §3.4, diffusers' `guidance_rescale` / `rescale_noise_cfg`): the guided
prediction is rescaled to the per-example standard deviation of the conditional one, then mixed,
`phi * rescaled + (1 - phi) * guided`. It is not affine, so the space matters: diffusers applies it to
the raw model output (eps for SDXL, v for v-prediction models). `rescale_space` names that space and
the wrapper converts the denoised estimates into it and back, reproducing diffusers for either model.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sdxl_jax.diffusion import denoisers
from sdxl_jax.diffusion.denoisers import Denoiser, Prediction


class Guided(NamedTuple):
    """The `cond` of a guided denoiser. Pass `scale`/`rescale` consistently as float32 arrays (or always as
    Python floats): a Python float is weak-typed, so switching between the two retraces once."""

    cond: Any
    uncond: Any
    scale: jax.Array | float
    rescale: jax.Array | float = 0.0


def uses_cfg(scale: float) -> bool:
    """diffusers' rule: the unconditional branch runs only for guidance scale > 1."""
    return float(scale) > 1.0


def guidance_combine(uncond: jax.Array, cond: jax.Array, scale) -> jax.Array:
    return uncond + denoisers.expand_to(scale, cond) * (cond - uncond)


def rescale_guided(guided: jax.Array, cond: jax.Array, phi) -> jax.Array:
    """Mix `guided` with itself rescaled to `cond`'s per-example std (over all non-batch axes).

    torch's unbiased std and numpy's biased one give the same ratio (same element count), so it is
    computed with the plain biased std."""
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
    phi = denoisers.expand_to(phi, guided)
    return phi * (guided * ratio) + (1.0 - phi) * guided


def _doubled(value):
    value = jnp.asarray(value)
    return value if value.ndim == 0 else jnp.concatenate([value, value])


def classifier_free_guidance(
    denoise: Denoiser, *, use_cfg: bool = True, rescale_space: Prediction | None = None
) -> Denoiser:
    """Wrap `denoise(x, sigma, t, cond)` into `guided(x, sigma, t, Guided(...))`.

    `rescale_space=None` skips guidance rescale entirely (no std reductions); otherwise
    `Guided.rescale` is the traced mixing factor phi (0 leaves the result unchanged).
    """
    if rescale_space is not None and rescale_space not in denoisers.TO_OUTPUT:
        raise ValueError(f"unknown rescale space {rescale_space!r}; valid: {', '.join(denoisers.TO_OUTPUT)}")

    if not use_cfg:

        def unguided(x, sigma, t, guided: Guided):
            return denoise(x, sigma, t, guided.cond)

        return unguided

    def guided_denoise(x, sigma, t, guided: Guided):
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), guided.uncond, guided.cond)
        out = denoise(jnp.concatenate([x, x]), _doubled(sigma), _doubled(t), both)
        d_uncond, d_cond = jnp.split(out, 2)
        d_guided = guidance_combine(d_uncond, d_cond, guided.scale)
        if rescale_space is None:
            return d_guided
        x32 = x.astype(jnp.float32)
        s = denoisers.expand_to(sigma, x32)
        to_space, from_space = denoisers.TO_OUTPUT[rescale_space], denoisers.FROM_OUTPUT[rescale_space]
        p_guided = rescale_guided(to_space(x32, s, d_guided), to_space(x32, s, d_cond), guided.rescale)
        return from_space(x32, s, p_guided)

    return guided_denoise
