"""Schedules against diffusers' schedulers and sgm's discretisation; handoff rules; training losses."""

import types

import numpy as np
import pytest

from sdxl_jax.diffusion import losses, schedules

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
from tests.helpers.torch_reference import SDXL_SCHEDULER  # noqa: E402  (needs torch)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")  # numpy-2 `copy=` notice

STEP_COUNTS = (1, 4, 7, 20, 30, 50)
# Sigma tolerance (relative): with the float32 table ours are diffusers' up to rounding (measured 3.4e-7);
# timesteps are exact, fractional Karras ones to float32 rounding of ~1000 (6.1e-5 measured).
SIGMA_RTOL = 1e-6
KARRAS_T_ATOL = 2e-4

TABLE32 = schedules.scaled_linear_table(diffusers_float32=True)
TABLE64 = schedules.scaled_linear_table()


def _diffusers(cls_name, n, **overrides):
    sch = getattr(diffusers, cls_name)(**{**SDXL_SCHEDULER, **overrides})
    sch.set_timesteps(n)
    return sch


def _assert_schedule(ours, timesteps, sigmas, init, t_atol=0.0):
    np.testing.assert_allclose(ours.timesteps, timesteps, rtol=0, atol=t_atol)
    np.testing.assert_allclose(ours.sigmas, sigmas, rtol=SIGMA_RTOL, atol=1e-9)
    assert ours.sigmas.dtype == np.float32 and ours.timesteps.dtype == np.float32
    assert np.all(np.diff(ours.sigmas) < 0)
    np.testing.assert_allclose(ours.init_noise_sigma, init, rtol=SIGMA_RTOL)


EULER_FAMILY = [
    ("EulerDiscreteScheduler", False),
    ("EulerDiscreteScheduler", True),
    ("EulerAncestralDiscreteScheduler", False),  # (it has no Karras option)
    ("HeunDiscreteScheduler", False),
    ("HeunDiscreteScheduler", True),
]


@pytest.mark.parametrize("cls_name,karras", EULER_FAMILY)
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_euler_family_matches_diffusers(cls_name, karras, spacing):
    extra = {"use_karras_sigmas": True} if karras else {}
    for n in STEP_COUNTS:
        sch = _diffusers(cls_name, n, timestep_spacing=spacing, **extra)
        t, s = sch.timesteps.numpy(), sch.sigmas.numpy()
        if cls_name == "HeunDiscreteScheduler":  # de-interleave [t0, t1, t1, t2, t2, ...]
            t, s = np.concatenate([t[:1], t[1::2]]), np.concatenate([s[:1], s[1::2]])
        ours = schedules.diffusers_euler(TABLE32, n, spacing, karras=karras)
        _assert_schedule(ours, t, s, float(sch.init_noise_sigma), KARRAS_T_ATOL if karras else 0.0)


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_dpmsolver_matches_diffusers(spacing, karras):
    for n in STEP_COUNTS:
        sch = _diffusers("DPMSolverMultistepScheduler", n, timestep_spacing=spacing, use_karras_sigmas=karras)
        ours = schedules.diffusers_dpmsolver(TABLE32, n, spacing, karras=karras)
        s = sch.sigmas.numpy()
        # diffusers' latent is VP (init 1.0); in sigma space that is sqrt(sigma_0² + 1).
        _assert_schedule(ours, sch.timesteps.numpy(), s, np.sqrt(float(s[0]) ** 2 + 1))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_matches_diffusers(spacing, set_alpha_to_one):
    for n in (1, 4, 20, 50):  # trailing: n divides 1000, so DDIM's t - 1000 // n is the next grid point
        sch = _diffusers("DDIMScheduler", n, timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one)
        t = sch.timesteps.numpy()
        assert np.all(t[1:] == t[:-1] - 1000 // n)
        ab = sch.alphas_cumprod.numpy()
        ab_seq = np.concatenate([ab[t], [float(sch.final_alpha_cumprod)]])
        sigmas = np.sqrt((1 - ab_seq) / ab_seq)
        ours = schedules.diffusers_ddim(TABLE32, n, spacing, set_alpha_to_one=set_alpha_to_one)
        _assert_schedule(ours, t, sigmas, np.sqrt(sigmas[0] ** 2 + 1))
    assert ours.sigmas[-1] == (0.0 if set_alpha_to_one else np.float32(TABLE32.sigmas[0]))


def test_tables():
    np.testing.assert_allclose(TABLE64.sigmas[[0, -1]], [0.029167, 14.614641], rtol=1e-5)
    # The float32 table is diffusers' (torch, float32) to rounding; the float64 one differs by ~1.3e-5.
    sch = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    ab = sch.alphas_cumprod.numpy()
    np.testing.assert_allclose(TABLE32.alphas_cumprod, ab, rtol=5e-7)
    np.testing.assert_allclose(TABLE64.alphas_cumprod, ab, rtol=3e-5)
    # Zero terminal SNR: diffusers' rescale, and its 2**-24 stand-in for alphabar_T = 0.
    zsnr = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER, rescale_betas_zero_snr=True)
    ours = schedules.scaled_linear_table(zero_terminal_snr=True)
    # diffusers' rescale runs in float32 (1 - ratio): ~1e-7 absolute.
    np.testing.assert_allclose(ours.betas, zsnr.betas.numpy(), rtol=3e-5, atol=3e-7)
    assert ours.alphas_cumprod[-1] == 2.0**-24 and ours.alphas_cumprod[0] == pytest.approx(TABLE64.alphas_cumprod[0])
    raw = schedules.rescale_zero_terminal_snr(TABLE64.betas)
    assert np.cumprod(1 - raw)[-1] == pytest.approx(0.0, abs=1e-12)
    for n in (1, 4, 25):
        sch = diffusers.EulerDiscreteScheduler(
            **{**SDXL_SCHEDULER, "timestep_spacing": "trailing"}, rescale_betas_zero_snr=True
        )
        sch.set_timesteps(n)
        got = schedules.diffusers_euler(
            schedules.scaled_linear_table(zero_terminal_snr=True, diffusers_float32=True), n, "trailing"
        )
        np.testing.assert_array_equal(got.timesteps, sch.timesteps.numpy())
        np.testing.assert_allclose(got.sigmas, sch.sigmas.numpy(), rtol=1e-5)


def test_sgm_legacy_50_steps():
    ours = schedules.sgm_legacy(TABLE64, 50)
    np.testing.assert_array_equal(ours.timesteps[:3], [999, 979, 959])
    assert ours.timesteps[-1] == 19 and len(ours.timesteps) == 50
    assert ours.sigmas[0] == pytest.approx(14.614641, rel=1e-6) and ours.sigmas[-1] == 0
    assert ours.init_noise_sigma == pytest.approx(np.sqrt(1 + 14.614641**2), rel=1e-6)
    # sgm quantises a sigma to its nearest table entry: its own grid maps back to its timesteps.
    np.testing.assert_array_equal(schedules.nearest_timestep(ours.sigmas[:-1], TABLE64), ours.timesteps)
    # SDXL demo refiner: strength 0.15 of 50 steps -> the last 6 steps, from sigma ~0.387.
    start = schedules.sgm_img2img_start(50, 0.15)
    assert 50 - start == 6 and ours.sigmas[start] == pytest.approx(0.3866, abs=1e-3)


def test_timestep_sigma_mapping():
    t = np.array([0.0, 1.0, 500.25, 998.5, 999.0])
    sig = schedules.timestep_to_sigma(t, TABLE64)
    np.testing.assert_allclose(sig[[0, 1, 4]], TABLE64.sigmas[[0, 1, 999]])
    nodes = schedules.sigma_to_timestep(TABLE64.sigmas[[0, 7, 999]], TABLE64)
    np.testing.assert_allclose(nodes, [0, 7, 999], atol=1e-9)
    back = schedules.sigma_to_timestep(sig, TABLE64)  # log-linear vs linear: close, not exact
    np.testing.assert_allclose(back, t, atol=0.01)
    # Out of range clips to the table ends.
    np.testing.assert_allclose(schedules.sigma_to_timestep([1e-4, 100.0], TABLE64), [0, 999])
    ks = schedules.karras_sigmas(10, 0.03, 14.6)
    assert ks[0] == pytest.approx(14.6) and ks[-1] == pytest.approx(0.03)
    np.testing.assert_allclose(np.diff(ks ** (1 / 7)), np.diff(ks ** (1 / 7))[0])


def test_turbo_schedule():
    one = schedules.turbo(TABLE32, 1)
    np.testing.assert_array_equal(one.timesteps, [999])
    assert one.init_noise_sigma == pytest.approx(float(one.sigmas[0]))  # trailing: no +1
    np.testing.assert_array_equal(schedules.turbo(TABLE32, 4).timesteps, [999, 749, 499, 249])
    with pytest.raises(ValueError, match="1–4 steps"):
        schedules.turbo(TABLE32, 8)


@pytest.mark.parametrize("n,frac", [(40, 0.8), (50, 0.8), (25, 0.7), (30, 0.65)])
def test_refiner_split_matches_diffusers(n, frac):
    full = schedules.diffusers_euler(TABLE32, n)
    base, refiner = schedules.split_for_refiner(full, frac)
    sch = _diffusers("EulerDiscreteScheduler", n)
    # Base pipeline (`denoising_end`): keep t >= round(1000 - 1000 * frac).
    cutoff = int(round(1000 - 1000 * frac))
    kept = [t for t in sch.timesteps.numpy() if t >= cutoff]
    assert base.num_steps == len(kept)
    np.testing.assert_array_equal(base.timesteps[: len(kept)], kept)
    np.testing.assert_array_equal(base.sigmas, full.sigmas[: len(kept) + 1])
    # Refiner (img2img pipeline's own `get_timesteps` with `denoising_start`).
    pipe_cls = diffusers.StableDiffusionXLImg2ImgPipeline
    t_ref, n_ref = pipe_cls.get_timesteps(types.SimpleNamespace(scheduler=sch), n, 0.3, "cpu", denoising_start=frac)
    np.testing.assert_array_equal(refiner.timesteps, t_ref.numpy())
    assert refiner.num_steps == n_ref and refiner.init_noise_sigma is None
    # The handoff level: the base ends where the refiner starts, and knows that level's timestep.
    assert refiner.sigmas[0] == base.sigmas[-1] and refiner.timesteps[0] == base.timesteps[-1]
    if (n, frac) == (40, 0.8):
        assert (base.num_steps, refiner.num_steps) == (32, 8)


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.99, 1.0])
def test_img2img_strength_matches_diffusers(strength):
    n = 30
    sch = _diffusers("EulerDiscreteScheduler", n)
    pipe_cls = diffusers.StableDiffusionXLImg2ImgPipeline
    t_ref, n_ref = pipe_cls.get_timesteps(types.SimpleNamespace(scheduler=sch), n, strength, "cpu")
    start = schedules.img2img_start(n, strength)
    part = schedules.tail(schedules.diffusers_euler(TABLE32, n), start)
    np.testing.assert_array_equal(part.timesteps, t_ref.numpy())
    assert part.num_steps == n_ref
    # diffusers noises the clean latent to the first kept sigma: x0 + sigma * noise (sigma space).
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ref = sch.add_noise(x0, noise, t_ref[:1])
    noisy = schedules.add_noise(x0.numpy(), noise.numpy(), part.sigmas[0])
    np.testing.assert_allclose(noisy, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_losses():
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(3, 4, 2, 2)).astype(np.float32), rng.normal(size=(3, 4, 2, 2)).astype(np.float32)
    t = np.array([0, 500, 999])
    ab = TABLE64.alphas_cumprod[t]
    sch = diffusers.DDPMScheduler(**{**SDXL_SCHEDULER, "prediction_type": "v_prediction"})
    tt = torch.from_numpy(t)
    ref_noisy = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    np.testing.assert_allclose(losses.noisy_latents(x0, noise, ab), ref_noisy, rtol=1e-4, atol=1e-5)
    ref_v = sch.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    np.testing.assert_allclose(losses.target(x0, noise, ab, "v_prediction"), ref_v, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(losses.target(x0, noise, ab, "epsilon"), noise)
    snr = np.asarray(losses.snr(ab))
    np.testing.assert_allclose(snr, 1 / TABLE64.sigmas[t] ** 2, rtol=1e-4)  # float32: 1 - ab cancels at t=0
    # Min-SNR-5: weight 1 where snr <= 5 (noisy end) for eps, min(snr,5)/snr elsewhere; v: / (snr + 1).
    w_eps = np.asarray(losses.loss_weights(snr, "min_snr", "epsilon", gamma=5.0))
    np.testing.assert_allclose(w_eps, np.minimum(snr, 5) / snr, rtol=1e-6)
    assert w_eps[0] < 0.01 and w_eps[2] == 1.0
    w_v = np.asarray(losses.loss_weights(snr, "min_snr", "v_prediction", gamma=5.0))
    np.testing.assert_allclose(w_v, np.minimum(snr, 5) / (snr + 1), rtol=1e-6)
    w_debiased = losses.loss_weights(snr, "debiased", "epsilon")
    np.testing.assert_allclose(w_debiased, 1 / np.sqrt(np.minimum(snr, 1000)), rtol=1e-6)
    pred = noise + 0.1
    assert float(losses.diffusion_loss(pred, noise)) == pytest.approx(0.01, rel=1e-5)
    assert float(losses.diffusion_loss(pred, noise, np.array([1.0, 0.0, 2.0]))) == pytest.approx(0.01, rel=1e-5)
    with pytest.raises(ValueError, match="valid: none, min_snr, debiased"):
        losses.loss_weights(snr, "p2", "epsilon")
