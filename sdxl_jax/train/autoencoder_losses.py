"""The loss of the KL autoencoder (the first stage), as CompVis' ldm trains it, in pure functions.

ldm's `LPIPSWithDiscriminator` (ldm/modules/losses/contperceptual.py, kept by Stability's sgm as
`GeneralLPIPSWithDiscriminator`), on NHWC images in [-1, 1], two optimiser steps per batch:

    autoencoder:    weighted_nll + kl_weight * kl + d_weight * disc_factor(step) * g_loss
    discriminator:  disc_factor(step) * hinge(D(x), D(x_rec))        (or the "vanilla" softplus loss)

    rec          = |x - x_rec| + perceptual_weight * lpips(x, x_rec)     per pixel; lpips `[B]` broadcast
    nll          = sum(rec / exp(logvar) + logvar) / B                    logvar: one scalar
    weighted_nll = the same with `weights * (rec / exp(logvar) + logvar)` (ldm's optional weights)
    kl           = sum(0.5 (mean² + var - 1 - logvar)) / B                over the posterior's h, w, c
    g_loss       = -mean(D(x_rec))
    d_weight     = disc_weight * stop_gradient(clip(|∇_L nll| / (|∇_L g_loss| + 1e-4), 0, 1e4))
    disc_factor(step) = disc_factor from step `disc_start` on (`step >= disc_start`), 0 before

where ∇_L is the gradient w.r.t. the decoder's last layer (ldm: `decoder.conv_out.weight`, the kernel
alone) and the nll there is the *unweighted* one. Sums run over every pixel and channel and are divided
by the batch size, so the loss grows with the image size, as ldm's does.

The caller computes the two last-layer gradients (`adaptive_weight` takes them) and the LPIPS distances
(`models.lpips`), and owns `logvar` (start it at `logvar_init`). ldm's optimiser does not include
`loss.logvar` (its `AutoencoderKL.configure_optimizers` lists encoder, decoder and the quant convs only),
so in ldm it stays at `logvar_init`; sgm makes that explicit with `learn_logvar=False`, which
`AutoencoderLossConfig.learn_logvar` mirrors.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdxl_jax.models.vae import DiagonalGaussian

ADAPTIVE_EPS = 1e-4  # ldm's `torch.norm(g_grads) + 1e-4`
ADAPTIVE_MAX = 1e4  # ldm's `torch.clamp(d_weight, 0.0, 1e4)`


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig:
    """The loss weights; the defaults are ldm's KL-f8 autoencoder (`autoencoder_kl_32x32x4.yaml`: disc_start
    50001, kl_weight 1e-6, disc_weight 0.5; the rest `LPIPSWithDiscriminator`'s own defaults).

    ldm's `pixelloss_weight` is stored but never used by its loss, so it has no field here."""

    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_weight: float = 0.5  # scales the adaptive weight
    disc_start: int = 50001  # the first step with the adversarial terms
    logvar_init: float = 0.0
    disc_factor: float = 1.0  # 0: no adversarial terms at all (ldm then skips the adaptive weight too)
    disc_loss: str = "hinge"  # a key of DISC_LOSSES
    learn_logvar: bool = False  # ldm and sgm leave logvar out of the optimiser

    def __post_init__(self):
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"unknown disc_loss {self.disc_loss!r}; valid: {', '.join(DISC_LOSSES)}")
        for name in ("perceptual_weight", "kl_weight", "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---- the terms -------------------------------------------------------------------------------------


def reconstruction_loss(inputs, reconstructions, lpips=None, perceptual_weight: float = 1.0) -> jax.Array:
    """Per-pixel `|x - x_rec| + perceptual_weight * lpips`, fp32 `[B, H, W, C]`; lpips `[B]` (one distance
    per example, added to every pixel and channel of it). lpips may be None when perceptual_weight is 0."""
    rec = jnp.abs(inputs.astype(jnp.float32) - reconstructions.astype(jnp.float32))
    if perceptual_weight > 0:
        if lpips is None:
            raise ValueError("perceptual_weight > 0 needs the LPIPS distances")
        lpips = jnp.asarray(lpips, jnp.float32)
        if lpips.shape != rec.shape[:1]:
            raise ValueError(f"lpips must be [B] = {rec.shape[:1]}, got {lpips.shape}")
        rec = rec + perceptual_weight * lpips.reshape(-1, *(1,) * (rec.ndim - 1))
    return rec


def nll_loss(rec: jax.Array, logvar: jax.Array, weights=None) -> jax.Array:
    """The Gaussian NLL with one learned log-variance, `sum(w * (rec / exp(logvar) + logvar)) / B`.

    rec: `reconstruction_loss`'s `[B, ...]`; weights (ldm's optional `weights`): anything broadcasting
    against rec, e.g. `[B, 1, 1, 1]`; None: the plain NLL (the one the adaptive weight differentiates)."""
    nll = rec / jnp.exp(logvar) + logvar
    if weights is not None:
        nll = weights * nll
    return jnp.sum(nll) / rec.shape[0]


def kl_loss(posterior: DiagonalGaussian) -> jax.Array:
    """KL(posterior || N(0, I)) summed over the latent's h, w, c, averaged over the batch
    (`from_moments` has already clamped logvar to [-30, 20], as ldm's distribution does)."""
    mean, logvar = posterior.mean.astype(jnp.float32), posterior.logvar.astype(jnp.float32)
    per_example = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))
    return jnp.sum(per_example) / mean.shape[0]


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """The autoencoder's adversarial term `-mean(D(x_rec))`."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def _norm(tree) -> jax.Array:
    """The Frobenius norm of an array (`torch.norm`), or of all a pytree's leaves together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def adaptive_weight(nll_grads, g_grads, disc_weight: float) -> jax.Array:
    """`disc_weight * clip(|nll_grads| / (|g_grads| + 1e-4), 0, 1e4)`, a constant for differentiation.

    nll_grads, g_grads: the gradients of `nll_loss` (unweighted) and `generator_loss` w.r.t. the decoder's
    last layer (ldm: the `conv_out` kernel alone), arrays or pytrees of the same structure."""
    ratio = _norm(nll_grads) / (_norm(g_grads) + ADAPTIVE_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_MAX)) * disc_weight


def adopt_weight(weight, step, threshold: int, value: float = 0.0) -> jax.Array:
    """`value` while `step < threshold`, `weight` from `threshold` on (ldm's `disc_start` switch); step
    may be traced."""
    return jnp.where(jnp.asarray(step) < threshold, jnp.float32(value), jnp.float32(weight))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """`0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))`."""
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """`0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))`: the non-saturating GAN's cross entropy."""
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


DISC_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


# ---- the two losses ----------------------------------------------------------------------------------


class GeneratorTerms(NamedTuple):
    """The autoencoder step's terms before the adversarial weighting (scalars, but `rec`)."""

    rec: jax.Array  # `[B, H, W, C]` per-pixel reconstruction loss
    nll: jax.Array  # unweighted: the adaptive weight's numerator differentiates this one
    weighted_nll: jax.Array  # what the total uses (== nll without weights)
    kl: jax.Array
    g_loss: jax.Array


def generator_terms(
    cfg: AutoencoderLossConfig,
    inputs,
    reconstructions,
    posterior: DiagonalGaussian,
    logvar,
    logits_fake,
    lpips=None,
    weights=None,
) -> GeneratorTerms:
    """Every term of the autoencoder step from the batch, its reconstruction, posterior and D(x_rec)."""
    rec = reconstruction_loss(inputs, reconstructions, lpips, cfg.perceptual_weight)
    nll = nll_loss(rec, logvar)
    weighted = nll if weights is None else nll_loss(rec, logvar, weights)
    return GeneratorTerms(rec, nll, weighted, kl_loss(posterior), generator_loss(logits_fake))


def autoencoder_loss(
    cfg: AutoencoderLossConfig, terms: GeneratorTerms, logvar, step, nll_grads=None, g_grads=None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the autoencoder step: `weighted_nll + kl_weight kl + d_weight disc_factor g_loss`.

    nll_grads, g_grads: `terms.nll`'s and `terms.g_loss`'s gradients w.r.t. the decoder's last layer;
    unused (and may be None) when `cfg.disc_factor` is 0, where d_weight is 0 as in ldm. The metrics
    carry ldm's log names."""
    if cfg.disc_factor > 0:
        if nll_grads is None or g_grads is None:
            raise ValueError("disc_factor > 0 needs the last layer's gradients of the NLL and the generator loss")
        d_weight = adaptive_weight(nll_grads, g_grads, cfg.disc_weight)
    else:
        d_weight = jnp.float32(0.0)
    disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
    loss = terms.weighted_nll + cfg.kl_weight * terms.kl + d_weight * disc_factor * terms.g_loss
    metrics = dict(
        total_loss=loss,
        logvar=jnp.asarray(logvar, jnp.float32),
        kl_loss=terms.kl,
        nll_loss=terms.nll,
        rec_loss=jnp.mean(terms.rec),
        d_weight=d_weight,
        disc_factor=disc_factor,
        g_loss=terms.g_loss,
    )
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def discriminator_loss(
    cfg: AutoencoderLossConfig, logits_real, logits_fake, step
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the discriminator step: `disc_factor(step) * DISC_LOSSES[cfg.disc_loss]`.

    logits_real = D(x), logits_fake = D(x_rec) with x_rec held fixed (ldm detaches it); any shape."""
    loss = adopt_weight(cfg.disc_factor, step, cfg.disc_start) * DISC_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    metrics = dict(disc_loss=loss, logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
