"""The first-stage (KL autoencoder) loss: each term against its closed form on small hand-made inputs, the
adaptive weight through `jax.grad` of a tiny last layer, and the whole of both steps against ldm's
`LPIPSWithDiscriminator.forward` (ldm/modules/losses/contperceptual.py): its GAN pieces are taming's
functions, which ldm imports and the test calls (`pip install --no-deps taming-transformers`); its NLL
and KL lines, which no installable package ships, are transcribed."""

import dataclasses
import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdxl_jax.models.vae import DiagonalGaussian
from sdxl_jax.train import autoencoder_losses as al
from tests.helpers.torch_reference import torchvision_stand_in

CFG = al.AutoencoderLossConfig()


def test_defaults_are_ldm_kl_f8():
    assert dataclasses.asdict(CFG) == dict(
        perceptual_weight=1.0, kl_weight=1e-6, disc_weight=0.5, disc_start=50001, logvar_init=0.0,
        disc_factor=1.0, disc_loss="hinge", learn_logvar=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown disc_loss 'wgan'; valid: hinge, vanilla"):
        al.AutoencoderLossConfig(disc_loss="wgan")
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        al.AutoencoderLossConfig(kl_weight=-1.0)


def test_reconstruction_and_nll_sum_over_pixels_and_average_over_the_batch():
    # x = 0, x_rec = c_b everywhere: rec = c_b + pw * p_b at each of the 2 * 2 * 3 = 12 values of example b
    x = np.zeros((2, 2, 2, 3), np.float32)
    x_rec = np.stack([np.full((2, 2, 3), -0.5), np.full((2, 2, 3), 0.25)]).astype(np.float32)
    lpips, pw, logvar = np.array([0.5, 1.0], np.float32), 2.0, 0.3
    rec = al.reconstruction_loss(x, x_rec, lpips, pw)
    np.testing.assert_allclose(rec[0], np.full((2, 2, 3), 0.5 + 2 * 0.5))
    np.testing.assert_allclose(rec[1], np.full((2, 2, 3), 0.25 + 2 * 1.0))
    want = (12 * 1.5 / np.exp(logvar) + 12 * logvar + 12 * 2.25 / np.exp(logvar) + 12 * logvar) / 2
    np.testing.assert_allclose(al.nll_loss(rec, jnp.float32(logvar)), want, rtol=1e-6)
    weights = np.array([2.0, 0.0], np.float32).reshape(2, 1, 1, 1)  # ldm's optional weights broadcast
    want_weighted = 2 * (12 * 1.5 / np.exp(logvar) + 12 * logvar) / 2
    np.testing.assert_allclose(al.nll_loss(rec, jnp.float32(logvar), weights), want_weighted, rtol=1e-6)
    # no perceptual term: LPIPS not needed; with one it is, per example
    np.testing.assert_allclose(al.reconstruction_loss(x, x_rec, None, 0.0), np.abs(x_rec))
    with pytest.raises(ValueError, match="needs the LPIPS distances"):
        al.reconstruction_loss(x, x_rec, None, 1.0)
    with pytest.raises(ValueError, match=r"lpips must be \[B\] = \(2,\), got \(2, 1, 1, 1\)"):
        al.reconstruction_loss(x, x_rec, lpips.reshape(2, 1, 1, 1), 1.0)


def test_kl_is_summed_over_the_latent_and_averaged_over_the_batch():
    mean = np.stack([np.full((2, 3, 4), 0.5), np.full((2, 3, 4), -1.0)]).astype(np.float32)
    logvar = np.stack([np.full((2, 3, 4), np.log(2.0)), np.zeros((2, 3, 4))]).astype(np.float32)
    per_value = [0.5 * (0.25 + 2.0 - 1.0 - np.log(2.0)), 0.5 * (1.0 + 1.0 - 1.0 - 0.0)]
    want = 24 * (per_value[0] + per_value[1]) / 2
    np.testing.assert_allclose(al.kl_loss(DiagonalGaussian(mean, logvar)), want, rtol=1e-6)
    assert float(al.kl_loss(DiagonalGaussian(np.zeros((3, 1, 1, 4)), np.zeros((3, 1, 1, 4))))) == 0.0
    # from moments, logvar clamped at 20 as ldm's DiagonalGaussianDistribution does
    moments = np.concatenate([np.zeros((1, 1, 1, 1)), np.full((1, 1, 1, 1), 50.0)], -1).astype(np.float32)
    np.testing.assert_allclose(al.kl_loss(DiagonalGaussian.from_moments(moments)), 0.5 * (np.exp(20) - 1 - 20))


def test_discriminator_losses_and_the_disc_start_switch():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.5, 1.0])
    # hinge: relu(1 - real) = 0, 0.5, 2; relu(1 + fake) = 0, 1.5, 2
    np.testing.assert_allclose(al.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 3.5 / 3), rtol=1e-6)
    softplus = lambda v: np.log1p(np.exp(v))
    want = 0.5 * (np.mean(softplus(-np.asarray(real))) + np.mean(softplus(np.asarray(fake))))
    np.testing.assert_allclose(al.vanilla_d_loss(real, fake), want, rtol=1e-6)
    assert float(al.generator_loss(fake)) == pytest.approx(-np.mean(np.asarray(fake)))
    # ldm: `if global_step < threshold: weight = value`, so the first step with the weight is disc_start
    for step, want_factor in ((0, 0.0), (50000, 0.0), (50001, 1.0), (60000, 1.0)):
        assert float(al.adopt_weight(1.0, step, 50001)) == want_factor
        assert float(jax.jit(al.adopt_weight, static_argnums=2)(1.0, step, 50001)) == want_factor  # traced step
        loss, _ = al.discriminator_loss(CFG, real, fake, step)
        assert float(loss) == pytest.approx(want_factor * float(al.hinge_d_loss(real, fake)))
    assert float(al.adopt_weight(0.7, 3, 5, value=0.25)) == 0.25
    vanilla = dataclasses.replace(CFG, disc_loss="vanilla", disc_factor=0.5, disc_start=0)
    assert float(al.discriminator_loss(vanilla, real, fake, 0)[0]) == pytest.approx(0.5 * want)


def test_adaptive_weight_is_the_clamped_gradient_norm_ratio():
    nll_grads = {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.zeros(2)}  # norm 5 (pytrees: all leaves)
    g_grads = {"kernel": jnp.array([[0.0, 2.0]]), "bias": jnp.array([0.0, 0.0])}  # norm 2
    np.testing.assert_allclose(al.adaptive_weight(nll_grads, g_grads, 0.5), 0.5 * 5 / (2 + 1e-4), rtol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, g_grads)
    assert float(al.adaptive_weight(nll_grads, zero, 0.5)) == 0.5 * 1e4  # 5 / 1e-4 = 5e4, clamped
    assert float(al.adaptive_weight(zero, g_grads, 0.5)) == 0.0


# A tiny "decoder last layer": x_rec = tanh(h @ K + b), and a fixed linear "discriminator" D(x) = x @ w.
B, H, W, CIN, C = 2, 3, 3, 5, 3


def _last_layer_setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((B, H, W, CIN)).astype(np.float32)
    kernel = (0.3 * rng.standard_normal((CIN, C))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(C)).astype(np.float32)
    d_w = rng.standard_normal((C, 1)).astype(np.float32)
    x = np.tanh(rng.standard_normal((B, H, W, C))).astype(np.float32)
    return features, kernel, bias, d_w, x


FEATURES, KERNEL, BIAS, D_W, X = _last_layer_setup()
LPIPS = np.array([0.2, 0.7], np.float32)
LOGVAR = np.float32(0.4)


def last_layer(kernel):
    return jnp.tanh(FEATURES @ kernel + BIAS)


def test_adaptive_weight_from_jax_grad_through_a_last_layer_matches_the_formula():
    nll_of = lambda k: al.nll_loss(al.reconstruction_loss(X, last_layer(k), LPIPS), LOGVAR)
    g_of = lambda k: al.generator_loss(last_layer(k) @ D_W)
    # closed forms: d x_rec / du = 1 - x_rec², u = h K + b
    x_rec = np.tanh(FEATURES @ KERNEL + BIAS)
    slope = 1 - x_rec**2
    d_nll = np.einsum("bhwi,bhwc->ic", FEATURES, -np.sign(X - x_rec) * slope) / (B * np.exp(LOGVAR))
    d_g = np.einsum("bhwi,bhwc->ic", FEATURES, -(D_W[:, 0] * slope)) / (B * H * W)
    nll_grads, g_grads = jax.jit(lambda k: (jax.grad(nll_of)(k), jax.grad(g_of)(k)))(KERNEL)
    np.testing.assert_allclose(nll_grads, d_nll, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_grads, d_g, rtol=1e-5, atol=1e-6)
    want = 0.5 * np.linalg.norm(d_nll) / (np.linalg.norm(d_g) + 1e-4)
    d_weight = al.adaptive_weight(nll_grads, g_grads, 0.5)
    np.testing.assert_allclose(d_weight, want, rtol=1e-5)

    # The weight is a constant to the total's gradient (it depends on K through the gradients' norms).
    def total(k, stop=True):
        ratio = jnp.linalg.norm(jax.grad(nll_of)(k)) / (jnp.linalg.norm(jax.grad(g_of)(k)) + 1e-4)
        weight = al.adaptive_weight(jax.grad(nll_of)(k), jax.grad(g_of)(k), 0.5) if stop else 0.5 * ratio
        return nll_of(k) + weight * g_of(k)

    np.testing.assert_allclose(jax.jit(jax.grad(total))(KERNEL), d_nll + want * d_g, rtol=1e-4, atol=1e-6)
    unstopped = jax.jit(jax.grad(lambda k: total(k, stop=False)))(KERNEL)
    assert np.abs(unstopped - (d_nll + want * d_g)).max() > 1e-3


# ---- against ldm's forward ------------------------------------------------------------------------------


def taming_losses() -> types.ModuleType:
    """taming's `vqperceptual`: `hinge_d_loss`, `vanilla_d_loss`, `adopt_weight` and
    `VQLPIPSWithDiscriminator.calculate_adaptive_weight`, which ldm's `LPIPSWithDiscriminator` imports and
    shares. The module imports taming's LPIPS, hence torchvision (the stand-in where it does not load)."""
    pytest.importorskip("taming", reason="pip install --no-deps taming-transformers")
    with torchvision_stand_in():
        return importlib.import_module("taming.modules.losses.vqperceptual")


def ldm_autoencoder_step(x, kernel, moments, p_loss, logvar, step, cfg, weights=None):
    """ldm's LPIPSWithDiscriminator.forward, optimizer_idx 0, with the tiny last layer and discriminator."""
    taming = taming_losses()
    feats = torch.from_numpy(FEATURES).permute(0, 3, 1, 2)
    recon = torch.tanh(F.conv2d(feats, kernel.T[:, :, None, None], torch.from_numpy(BIAS)))
    # Transcribed from ldm's LPIPSWithDiscriminator.forward (no package ships it): the reconstruction
    # term, the NLL with one log-variance and optional weights, the KL of DiagonalGaussianDistribution.kl
    # (logvar clamped to [-30, 20]), the generator's loss.
    rec = torch.abs(x - recon)
    if cfg.perceptual_weight > 0:
        rec = rec + cfg.perceptual_weight * p_loss  # p_loss [B, 1, 1, 1]
    nll = rec / torch.exp(logvar) + logvar
    weighted = nll if weights is None else weights * nll
    weighted = torch.sum(weighted) / weighted.shape[0]
    nll = torch.sum(nll) / nll.shape[0]
    mean, lv = torch.chunk(moments, 2, dim=1)
    lv = torch.clamp(lv, -30.0, 20.0)
    kl = 0.5 * torch.sum(mean**2 + torch.exp(lv) - 1.0 - lv, dim=[1, 2, 3])
    kl = torch.sum(kl) / kl.shape[0]
    logits_fake = F.conv2d(recon, torch.from_numpy(D_W).T[:, :, None, None])
    g_loss = -torch.mean(logits_fake)
    # taming's own functions from here on
    if cfg.disc_factor > 0:
        loss_module = types.SimpleNamespace(discriminator_weight=cfg.disc_weight)  # all the method reads of self
        d_weight = taming.VQLPIPSWithDiscriminator.calculate_adaptive_weight(loss_module, nll, g_loss, kernel)
    else:
        d_weight = torch.tensor(0.0)
    disc_factor = taming.adopt_weight(cfg.disc_factor, step, threshold=cfg.disc_start)
    loss = weighted + cfg.kl_weight * kl + d_weight * disc_factor * g_loss
    log = dict(total_loss=loss, logvar=logvar, kl_loss=kl, nll_loss=nll, rec_loss=rec.mean(), d_weight=d_weight,
               disc_factor=torch.tensor(disc_factor), g_loss=g_loss)  # fmt: skip
    return loss, {k: v.detach().numpy() for k, v in log.items()}, torch.autograd.grad(loss, kernel)[0].numpy()


def ldm_discriminator_step(logits_real, logits_fake, step, cfg):
    """ldm's LPIPSWithDiscriminator.forward, optimizer_idx 1: taming's functions."""
    taming = taming_losses()
    d_loss = {"hinge": taming.hinge_d_loss, "vanilla": taming.vanilla_d_loss}[cfg.disc_loss]
    return taming.adopt_weight(cfg.disc_factor, step, threshold=cfg.disc_start) * d_loss(logits_real, logits_fake)


@pytest.mark.parametrize(
    "cfg, step, weighted",
    [
        (al.AutoencoderLossConfig(kl_weight=0.1, disc_start=10), 9, False),  # before disc_start
        (al.AutoencoderLossConfig(kl_weight=0.1, disc_start=10), 10, True),
        (al.AutoencoderLossConfig(kl_weight=0.1, disc_start=0, disc_factor=0.0, perceptual_weight=0.0), 5, False),
        (al.AutoencoderLossConfig(kl_weight=0.1, disc_start=0, disc_loss="vanilla", disc_weight=2.0), 0, False),
    ],
)
def test_both_steps_match_ldm(cfg, step, weighted):
    rng = np.random.default_rng(1)
    moments = rng.standard_normal((B, 2, 2, 8)).astype(np.float32)
    weights = np.array([1.5, 0.5], np.float32).reshape(B, 1, 1, 1) if weighted else None

    def ours(kernel):
        x_rec = last_layer(kernel)
        logits_fake = x_rec @ D_W
        terms = al.generator_terms(
            cfg, X, x_rec, DiagonalGaussian.from_moments(moments), LOGVAR, logits_fake, LPIPS, weights
        )
        nll_of = lambda k: al.nll_loss(al.reconstruction_loss(X, last_layer(k), LPIPS, cfg.perceptual_weight), LOGVAR)
        grads = (jax.grad(nll_of)(kernel), jax.grad(lambda k: al.generator_loss(last_layer(k) @ D_W))(kernel))
        return al.autoencoder_loss(cfg, terms, LOGVAR, step, *grads)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(KERNEL)
    kernel = torch.from_numpy(KERNEL).requires_grad_(True)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))
    want_loss, want_log, want_grad = ldm_autoencoder_step(
        nchw(X), kernel, nchw(moments), torch.from_numpy(LPIPS).reshape(B, 1, 1, 1), torch.tensor(LOGVAR), step,
        cfg, None if weights is None else torch.from_numpy(weights).reshape(B, 1, 1, 1),
    )  # fmt: skip
    np.testing.assert_allclose(loss, want_loss.detach().numpy(), rtol=1e-5)
    assert set(metrics) == set(want_log)
    for name, value in want_log.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert (float(metrics["d_weight"]) > 0) == (cfg.disc_factor > 0)

    real, fake = rng.standard_normal((B, 2, 2, 1)).astype(np.float32), rng.standard_normal((B, 2, 2, 1))
    d_loss, d_metrics = al.discriminator_loss(cfg, real, fake.astype(np.float32), step)
    want_d = ldm_discriminator_step(torch.from_numpy(real), torch.from_numpy(fake).float(), step, cfg)
    np.testing.assert_allclose(d_loss, want_d.numpy(), rtol=1e-6)
    np.testing.assert_allclose(d_metrics["logits_fake"], fake.mean(), rtol=1e-5)


def test_the_adaptive_weight_needs_the_gradients():
    terms = al.GeneratorTerms(jnp.zeros((1, 8, 8, 3)), *(jnp.float32(0),) * 4)
    with pytest.raises(ValueError, match="needs the last layer's gradients"):
        al.autoencoder_loss(CFG, terms, 0.0, 0)
