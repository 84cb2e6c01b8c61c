"""The training objective against closed forms: targets, weights, timestep ranges, offset noise; the
optimiser's schedules, Muon's split between kernels and the rest, and the EMA decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sdxl_jax.diffusion import losses, parameterisation, schedules
from sdxl_jax.train.config import diffusion_defaults, optimizer_defaults
from sdxl_jax.train.objective import alphas_cumprod, diffusion_loss
from sdxl_jax.train.optim import ema_decay, lr_schedule

ALPHABAR = schedules.scaled_linear_table().alphas_cumprod  # float64


def diffusion_cfg(**changes):
    cfg = diffusion_defaults()
    cfg.update(changes)
    return cfg


def closed_form(x0, noise, t, prediction, weighting, gamma=5.0):
    """(model input x_t, target, weights) in float64 numpy."""
    ab = ALPHABAR[t][:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    target = {"epsilon": noise, "v_prediction": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0, "sample": x0}[prediction]
    snr = ALPHABAR[t] / (1 - ALPHABAR[t])
    eps_weights = {
        "none": np.ones_like(snr),
        "min_snr": np.minimum(snr, gamma) / snr,
        "debiased": 1 / np.sqrt(np.minimum(snr, 1000.0)),
        "min_snr_v": np.minimum(snr + 1, gamma) / snr,
    }
    weights = eps_weights[weighting]
    if prediction == "v_prediction" and weighting == "min_snr":
        weights = np.minimum(snr, gamma) / (snr + 1)
    if prediction == "v_prediction" and weighting == "min_snr_v":
        weights = np.minimum(snr + 1, gamma) / (snr + 1)
    if prediction == "sample":  # x0 error² = eps error² / snr: the eps weight times snr (before clipping)
        weights = {
            "none": np.ones_like(snr),
            "min_snr": np.minimum(snr, gamma),
            "debiased": np.sqrt(np.minimum(snr, 1000.0)),
            "min_snr_v": np.minimum(snr + 1, gamma),
        }[weighting]
    return x_t, target, weights


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "debiased", "min_snr_v"])
def test_loss_matches_closed_form(prediction, weighting):
    x0 = np.random.default_rng(0).standard_normal((6, 4, 4, 4)).astype(np.float32)
    seen = {}

    def model(x_t, t, cond):  # a fixed "network": half its input
        seen["x_t"], seen["t"] = x_t, t
        return 0.5 * x_t

    cfg = diffusion_cfg(prediction=prediction, weighting=weighting)
    loss, aux = jax.jit(lambda x, k: diffusion_loss(model, cfg, x, None, k))(x0, jax.random.key(3))
    t, noise = np.asarray(aux["t"]), np.asarray(aux["noise"], np.float64)
    x_t, target, weights = closed_form(x0.astype(np.float64), noise, t, prediction, weighting)
    np.testing.assert_allclose(np.asarray(aux["weights"]), weights, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(aux["noise"]).std(), 1.0, atol=0.15)
    per_example = ((0.5 * x_t - target) ** 2).reshape(6, -1).mean(1)
    np.testing.assert_allclose(float(loss), (per_example * weights).mean(), rtol=2e-5)


def test_timesteps_stay_in_the_configured_range():
    x0 = jnp.zeros((512, 1, 1, 4))
    _, aux = diffusion_loss(lambda x, t, c: x, diffusion_cfg(t_min=0, t_max=200), x0, None, jax.random.key(0))
    t = np.asarray(aux["t"])
    assert t.min() >= 0 and t.max() < 200 and t.max() > 150  # the refiner's t < 200, spread over it
    _, aux = diffusion_loss(lambda x, t, c: x, diffusion_cfg(t_min=900, t_max=1000), x0, None, jax.random.key(0))
    assert np.asarray(aux["t"]).min() >= 900


@pytest.mark.parametrize("weighting", ["min_snr", "min_snr_v"])  # debiased uses eps's weight for v as-is
def test_a_weighting_weighs_the_same_x0_error_alike_in_every_prediction(weighting):
    """One denoised estimate, expressed as each prediction type's output: the weighted losses agree."""
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 64, 4, 4, 4))
    t = np.array([0, 50, 200, 400, 600, 800, 950, 999] * 8)
    ab = alphas_cumprod(diffusion_cfg(zero_terminal_snr=True)).astype(np.float64)[t][:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    x0_hat = x0 + 0.1 * rng.standard_normal(x0.shape)
    eps_hat = (x_t - np.sqrt(ab) * x0_hat) / np.sqrt(1 - ab)
    outputs = {"sample": x0_hat, "epsilon": eps_hat, "v_prediction": np.sqrt(ab) * eps_hat - np.sqrt(1 - ab) * x0_hat}
    snr = losses.snr(ab[:, 0, 0, 0])
    per_prediction = {}
    for prediction, out in outputs.items():
        weights = losses.loss_weights(snr, weighting, prediction, gamma=5.0)
        target = losses.target(x0, noise, ab[:, 0, 0, 0], prediction)
        per_prediction[prediction] = float(losses.diffusion_loss(out, target, weights))
    # eps at the last step (snr 2^-24) amplifies float32 rounding; still within 1e-3
    np.testing.assert_allclose(per_prediction["epsilon"], per_prediction["sample"], rtol=1e-3)
    np.testing.assert_allclose(per_prediction["v_prediction"], per_prediction["sample"], rtol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_one_parameterisation_serves_the_trainer_and_the_sampler(prediction):
    """The training target at x_t, read through the sampler's map at the same noise level (sigma = s / alpha),
    is x0 again; the map back gives the target; an x0 error of d moves the output by sqrt(error_scale) d."""
    p = parameterisation.get(prediction)
    rng = np.random.default_rng(2)
    x0, eps, d = rng.standard_normal((3, 6, 3, 3, 4)).astype(np.float32)
    ab = np.linspace(0.05, 0.95, 6, dtype=np.float32)
    alpha, s = np.sqrt(ab)[:, None, None, None], np.sqrt(1 - ab)[:, None, None, None]
    x, sigma = x0 + s / alpha * eps, s / alpha  # sigma space: x = x0 + sigma eps
    target = np.asarray(p.target(x0, eps, alpha, s))
    np.testing.assert_allclose(p.to_denoised(x, sigma, target), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.from_denoised(x, sigma, x0), target, rtol=1e-4, atol=1e-4)
    moved = np.asarray(p.from_denoised(x, sigma, x0 + d)) - np.asarray(p.from_denoised(x, sigma, x0))
    ratio = (moved**2).sum(axis=(1, 2, 3)) / (d**2).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(ratio, np.broadcast_to(p.error_scale(ab / (1 - ab)), ab.shape), rtol=1e-4)
    with pytest.raises(ValueError, match="valid: epsilon, v_prediction, sample"):
        parameterisation.get("flow")


def test_min_snr_v_keeps_weight_at_pure_noise():
    snr = jnp.array([0.0, 1.0, 3.0, 10.0])
    np.testing.assert_allclose(losses.loss_weights(snr, "min_snr_v", "sample", 5.0), [1, 2, 4, 5])
    np.testing.assert_allclose(losses.loss_weights(snr, "min_snr", "sample", 5.0), [0, 1, 3, 5])


def test_shifted_timesteps_follow_the_shifted_distribution():
    key = jax.random.key(4)
    np.testing.assert_array_equal(losses.sample_timesteps(key, 64, 0, 1000), jax.random.randint(key, (64,), 0, 1000))
    t = np.asarray(losses.sample_timesteps(key, 200_000, 0, 1000, shift=3.0))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    # P(t >= 500) = P(u' >= 1/2) = s / (s + 1); P(t < 100) = P(u < 0.1 / (s - 0.1 (s - 1))) = 1/28
    assert abs((t >= 500).mean() - 0.75) < 0.005 and abs((t < 100).mean() - 1 / 28) < 0.002
    t = np.asarray(losses.sample_timesteps(key, 10_000, 900, 1000, shift=3.0))
    assert t.min() >= 900 and t.max() <= 999 and (t >= 950).mean() > 0.7
    with pytest.raises(ValueError, match="shift"):
        losses.sample_timesteps(key, 4, 0, 1000, shift=0.0)
    cfg = diffusion_cfg(timestep_shift=3.0)
    _, aux = diffusion_loss(lambda x, t, c: x, cfg, jnp.zeros((4096, 1, 1, 4)), None, jax.random.key(0))
    assert abs((np.asarray(aux["t"]) >= 500).mean() - 0.75) < 0.03  # the trainer's step uses it


def test_offset_noise_adds_a_per_channel_constant():
    x0 = jnp.zeros((256, 8, 8, 4))
    plain = diffusion_loss(lambda x, t, c: x, diffusion_cfg(), x0, None, jax.random.key(1))[1]["noise"]
    offset = diffusion_loss(lambda x, t, c: x, diffusion_cfg(offset_noise=0.5), x0, None, jax.random.key(1))[1]["noise"]
    diff = np.asarray(offset - plain)
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :], diff.shape), atol=1e-6)  # constant over h, w
    np.testing.assert_allclose(diff[:, 0, 0, :].std(), 0.5, rtol=0.1)


def test_zero_terminal_snr_table():
    assert alphas_cumprod(diffusion_cfg(zero_terminal_snr=True))[-1] == np.float32(2.0**-24)
    np.testing.assert_allclose(alphas_cumprod(diffusion_cfg()), ALPHABAR, rtol=1e-6)


def test_lr_schedules_and_ema_decay():
    opt = ml_collections.ConfigDict(dict(schedule="cosine", warmup_steps=10, decay_steps=110, end_factor=0.1))
    lr = lr_schedule(opt, 1e-3)
    np.testing.assert_allclose(
        [float(lr(s)) for s in (0, 5, 10, 60, 110, 500)], [0.0, 5e-4, 1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4, 1e-4], rtol=1e-5
    )
    opt.schedule = "constant"
    np.testing.assert_allclose(
        [float(lr_schedule(opt, 2e-4)(s)) for s in (0, 5, 10, 10_000)], [0, 1e-4, 2e-4, 2e-4], rtol=1e-6
    )
    ema = ml_collections.ConfigDict(dict(decay=0.999, warmup=True))
    np.testing.assert_allclose(
        [float(ema_decay(ema, jnp.int32(n))) for n in (0, 10, 10_000_000)], [0.1, 11 / 20, 0.999], rtol=1e-6
    )
    ema.warmup = False
    assert float(ema_decay(ema, jnp.int32(0))) == np.float32(0.999)


def _plain_optimizer(name: str):
    """The optimizer defaults with what the optimizer tests need: no decay, no clipping, their own LRs."""
    opt = optimizer_defaults()
    opt.update(name=name, learning_rate=1e-2, text_encoder_learning_rate=1e-3, decay_steps=1, weight_decay=0.0,
               grad_clip_norm=1e9)  # fmt: skip
    return opt


def test_accumulation_averages_gradients_and_text_encoders_get_their_own_lr():
    from sdxl_jax.train.optim import make_optimizer

    opt = _plain_optimizer("adamw")
    params = {"unet": {"w": jnp.ones(3)}, "text_encoder_2": {"w": jnp.ones(3)}}
    g1 = jax.tree.map(lambda p: p * jnp.array([1.0, -2.0, 3.0]), params)
    g2 = jax.tree.map(lambda p: p * jnp.array([3.0, 1.0, -1.0]), params)
    tx, _ = make_optimizer(opt, ("unet", "text_encoder_2"))
    once, _ = tx.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), tx.init(params), params)
    opt.accumulation_steps = 2
    tx2, _ = make_optimizer(opt, ("unet", "text_encoder_2"))
    state = tx2.init(params)
    first, state = tx2.update(g1, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(first))  # nothing moves mid-window
    second, state = tx2.update(g2, state, params)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(once)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # AdamW's first step is -lr * sign(g): the UNet's LR and the text encoders' own
    np.testing.assert_allclose(once["unet"]["w"], [-1e-2, 1e-2, -1e-2], rtol=1e-4)
    np.testing.assert_allclose(once["text_encoder_2"]["w"], [-1e-3, 1e-3, -1e-3], rtol=1e-4)


def _singular_spread(matrix) -> float:
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    return float(s.max() / s.min())


def test_muon_orthogonalises_every_kernel_and_adamw_moves_the_rest():
    from sdxl_jax.train.optim import make_optimizer

    opt = _plain_optimizer("muon")
    shapes = {
        "unet": {
            "conv": {"kernel": (3, 3, 4, 8), "bias": (8,)},
            "dense": {"kernel": (16, 8)},
            "scanned": {"kernel": (2, 8, 24), "bias": (2, 24)},
        },
        "text_encoder_2": {"dense": {"kernel": (8, 8)}},
    }
    keys = iter(jax.random.split(jax.random.key(0), 16))
    params = jax.tree.map(lambda shape: jnp.ones(shape), shapes, is_leaf=lambda x: isinstance(x, tuple))
    # gradients with very unequal singular values (a random matrix times a ramp along its outputs)
    grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * jnp.linspace(0.1, 3.0, p.shape[-1]), params)
    tx, _ = make_optimizer(opt, ("unet", "text_encoder_2"))
    updates, _ = tx.update(grads, tx.init(params), params)
    unet, g = updates["unet"], grads["unet"]
    assert _singular_spread(g["conv"]["kernel"].reshape(36, 8)) > 10
    # kernels: orthogonalised (Newton-Schulz leaves singular values within about 0.7-1.2), as [kh*kw*in, out]
    # matrices, one per scanned layer, scaled to an RMS of 0.2 x lr
    for matrix in (unet["conv"]["kernel"].reshape(36, 8), unet["dense"]["kernel"], *unet["scanned"]["kernel"]):
        assert _singular_spread(matrix) < 2.0
        assert 0.1 * 1e-2 < float(jnp.sqrt(jnp.mean(matrix**2))) < 0.3 * 1e-2
    # biases (also a scanned [layers, C] one): Nesterov AdamW (optax's Muon takes its Nesterov flag there
    # too), whose first step is -lr * (1 + b1 / (1 + b1)) * sign(g)
    nadam = 1e-2 * (1 + 0.9 / 1.9)
    np.testing.assert_allclose(unet["conv"]["bias"], -nadam * jnp.sign(g["conv"]["bias"]), rtol=1e-4)
    np.testing.assert_allclose(unet["scanned"]["bias"], -nadam * jnp.sign(g["scanned"]["bias"]), rtol=1e-4)
    # the text encoders: plain AdamW, -lr * sign(g) on the first step
    text = updates["text_encoder_2"]["dense"]["kernel"]
    np.testing.assert_allclose(text, -1e-3 * jnp.sign(grads["text_encoder_2"]["dense"]["kernel"]), rtol=1e-4)
    opt.name = "sgd"
    with pytest.raises(ValueError, match="optimizer.name 'sgd'"):
        make_optimizer(opt, ("unet",))


def test_a_sample_prediction_model_is_its_own_denoiser():
    from sdxl_jax.diffusion.denoisers import make_denoiser

    x = jnp.full((2, 3), 4.0)
    seen = {}

    def model(x_in, t, cond):
        seen["x_in"] = x_in
        return jnp.full_like(x_in, 0.25)

    denoised = make_denoiser(model, "sample")(x, jnp.array([1.0, 3.0]), jnp.array([10, 20]), None)
    np.testing.assert_allclose(denoised, 0.25)
    np.testing.assert_allclose(seen["x_in"][:, 0], [4 / np.sqrt(2), 4 / np.sqrt(10)], rtol=1e-6)  # c_in x
