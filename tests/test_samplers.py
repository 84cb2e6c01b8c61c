"""Samplers against closed-form Gaussian answers and step for step against diffusers; guidance; tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import denoisers, guidance, samplers, schedules

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
from tests.helpers.torch_reference import SDXL_SCHEDULER  # noqa: E402  (needs torch)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")  # numpy-2 `copy=` notice

TABLE32 = schedules.scaled_linear_table(diffusers_float32=True)

# Data ~ N(MU, S²) per dimension: the exact denoiser and the exact probability-flow ODE are closed-form.
MU = jnp.array([0.5, -1.0, 0.0, 2.0])
S = jnp.array([0.3, 1.0, 2.0, 0.7])


def _key(seed):
    """PRNG keys for the stochastic tests. "rbg" rather than the default threefry only to save compile time
    (threefry's partitionable lowering takes ~3 s per jitted function on a loaded 2-core CPU, rbg ~1 s);
    the sampler's noise contract does not depend on the implementation (the turbo test uses threefry)."""
    return jax.random.key(seed, impl="rbg")


def _randn(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def gaussian_denoise(x, sigma, t, cond):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def gaussian_flow(x_from, sigma_from, sigma_to):
    return MU + (x_from - MU) * jnp.sqrt((S**2 + sigma_to**2) / (S**2 + sigma_from**2))


# ---------------------------------------------------------------------------------------------------
# deterministic samplers: convergence at the sampler's order

ORDERS = {"euler": (0.9, 1.1), "ddim": (0.9, 1.1), "heun": (1.9, 2.2), "dpmpp_2m": (1.9, 2.2)}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_deterministic_order(name):
    x_t = 14.6 * _randn((64, 4), 0)
    steps, errors = (8, 16, 32, 64), []
    for n in steps:
        # Karras sigmas down to 0.03 (not 0, so the last step is a regular step of the method too).
        sigmas = schedules.karras_sigmas(n + 1, 0.03, 14.6).astype(np.float32)
        x = samplers.sample_jit(gaussian_denoise, x_t, sigmas, np.zeros(n, np.float32), name)
        errors.append(float(jnp.max(jnp.abs(x - gaussian_flow(x_t, sigmas[0], sigmas[-1])))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    lo, hi = ORDERS[name]
    assert lo < slope < hi, (errors, slope)
    assert errors[-1] < (0.15 if lo < 1.5 else 0.006)  # measured 0.129 (1st order), 0.005 (2nd order)


def test_last_step_to_zero_is_the_denoiser():
    # A step to sigma 0 returns the denoised estimate (Heun and DPM++ 2M fall back to first order there).
    x = jnp.array([[3.0, -2.0, 1.0, 0.5]])
    for name in ("euler", "heun", "dpmpp_2m", "ddim"):
        out = samplers.sample_jit(gaussian_denoise, x, np.array([2.0, 0.0], np.float32), np.zeros(1, np.float32), name)
        np.testing.assert_allclose(out, gaussian_denoise(x, 2.0, 0, None), rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------
# stochastic samplers: the distribution of samples


def _gaussian_start(n_samples, sigma_0, seed):
    """Samples of the exact marginal at sigma_0, N(MU, S² + sigma_0²)."""
    z = np.random.default_rng(seed).standard_normal((n_samples, 4)).astype(np.float32)
    return MU + jnp.sqrt(S**2 + sigma_0**2) * z


def test_euler_ancestral_distribution_exact_recursion():
    """With the exact denoiser each ancestral step is a linear-Gaussian map, so the sample mean and variance
    can be propagated exactly: the samples must match them (statistics), and they must approach
    N(MU, S²) at first order in the number of steps."""
    n_samples, sigma_max = 8192, 14.6

    def propagate(sigmas):
        mean, var = np.asarray(MU, np.float64), np.asarray(S, np.float64) ** 2 + sigmas[0] ** 2
        s2 = np.asarray(S, np.float64) ** 2
        for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
            up = np.sqrt(nxt**2 * (sigma**2 - nxt**2) / sigma**2)
            down = np.sqrt(nxt**2 - up**2)
            a = 1 + (1 - s2 / (s2 + sigma**2)) * (down - sigma) / sigma  # x' - MU = a (x - MU) + up z
            mean, var = MU + a * (mean - MU), a**2 * var + up**2
        return np.asarray(mean), var

    # The samples follow the recursion (checked at 40 steps)...
    n = 40
    sigmas = np.append(schedules.karras_sigmas(n, 0.03, sigma_max), 0.0).astype(np.float32)
    x = samplers.sample_jit(
        gaussian_denoise, _gaussian_start(n_samples, sigmas[0], 1), sigmas, np.zeros(n, np.float32), "euler_a", _key(2)
    )
    mean, var = propagate(sigmas.astype(np.float64))
    assert np.all(np.abs(np.asarray(x.mean(0)) - mean) < 5 * np.sqrt(var / n_samples))
    assert np.all(np.abs(np.asarray(x.var(0)) / var - 1) < 5 * np.sqrt(2 / n_samples))
    # ...and the recursion converges to the data distribution at first order (4x the steps, ~4x closer).
    gaps = []
    for n in (10, 40, 160):
        _, var = propagate(np.append(schedules.karras_sigmas(n, 0.03, sigma_max), 0.0))
        gaps.append(np.max(np.abs(np.sqrt(var) / np.asarray(S) - 1)))
    assert gaps[1] < 0.1 and 3.0 < gaps[0] / gaps[1] < 5.0 and 3.0 < gaps[1] / gaps[2] < 5.0, gaps


def test_dpmpp_2m_sde_distribution():
    n, n_samples = 30, 8192
    sigmas = np.append(schedules.karras_sigmas(n, 0.03, 14.6), 0.0).astype(np.float32)
    x = samplers.sample_jit(
        gaussian_denoise,
        _gaussian_start(n_samples, sigmas[0], 4),
        sigmas,
        np.zeros(n, np.float32),
        "dpmpp_2m_sde",
        _key(5),
    )
    se = np.asarray(S) / np.sqrt(n_samples)
    assert np.all(np.abs(np.asarray(x.mean(0) - MU)) < 5 * se)
    # 2nd order: measured std within 1.5% of S at 30 steps; statistical std error 0.8%.
    np.testing.assert_allclose(np.asarray(x.std(0)), np.asarray(S), rtol=0.05)


# ---------------------------------------------------------------------------------------------------
# step for step against diffusers' schedulers

M = np.linspace(-1.0, 1.0, 4).astype(np.float32).reshape(4, 1, 1)


def torch_model(x_in, t):
    return 0.9 * x_in + 0.1 * torch.cos(0.01 * torch.as_tensor(t).float()) * torch.from_numpy(M)


def jax_model(x_in, t, cond):
    return 0.9 * x_in + 0.1 * jnp.cos(0.01 * t)[:, None, None, None] * M


@jax.jit
def _step_noises(key, like):
    """The driver's noise contract: step i draws `normal(split(key, n)[i], x.shape)`."""
    keys = jax.random.split(key, like.shape[0])
    return jnp.stack([jax.random.normal(k, like.shape[1:], jnp.float32) for k in keys])


# name: (diffusers class, config overrides, step kwargs, our schedule builder, sampler, VP-space latents)
DIFFUSERS_CASES = {
    "euler": ("EulerDiscreteScheduler", {}, None, schedules.diffusers_euler, "euler", False),
    "euler_v": (
        "EulerDiscreteScheduler",
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        None,
        lambda tab, n: schedules.diffusers_euler(tab, n, "trailing"),
        "euler",
        False,
    ),
    "euler_karras_linspace": (
        "EulerDiscreteScheduler",
        {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
        None,
        lambda tab, n: schedules.diffusers_euler(tab, n, "linspace", karras=True),
        "euler",
        False,
    ),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "patch", schedules.diffusers_euler, "euler_a", False),
    "heun": ("HeunDiscreteScheduler", {}, None, schedules.diffusers_euler, "heun", False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, None, schedules.diffusers_dpmsolver, "dpmpp_2m", True),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
        None,
        lambda tab, n: schedules.diffusers_dpmsolver(tab, n, karras=True),
        "dpmpp_2m",
        True,
    ),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
        "variance_noise",
        schedules.diffusers_dpmsolver,
        "dpmpp_2m_sde",
        True,
    ),
    "ddim": (
        "DDIMScheduler",
        {"set_alpha_to_one": False, "clip_sample": False},
        None,
        schedules.diffusers_ddim,
        "ddim",
        True,
    ),
    "ddim_eta1": (
        "DDIMScheduler",
        {"set_alpha_to_one": False, "clip_sample": False},
        "eta1",
        schedules.diffusers_ddim,
        samplers.ddim(1.0),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CASES))
def test_matches_diffusers_step_by_step(case, monkeypatch):
    cls_name, overrides, noise_mode, build, sampler, vp = DIFFUSERS_CASES[case]
    shape = (2, 4, 4, 4)
    prediction = overrides.get("prediction_type", "epsilon")
    denoise = denoisers.make_denoiser(jax_model, prediction)
    # Deterministic: a 1-step, a short and a longer run; stochastic (slow to compile): one 6-step run.
    for n in (6,) if noise_mode else (1, 4, 12):
        sched = build(TABLE32, n)
        noise = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
        key = _key(100 + n)
        step_noise = (
            [torch.from_numpy(z) for z in np.array(_step_noises(key, jnp.zeros((n,) + shape)))] if noise_mode else []
        )

        sch = getattr(diffusers, cls_name)(**{**SDXL_SCHEDULER, **overrides})
        sch.set_timesteps(n)
        if noise_mode == "patch":  # the ancestral step's randn_tensor hands out our noise, in order
            pending = iter(step_noise)
            monkeypatch.setattr(
                diffusers.schedulers.scheduling_euler_ancestral_discrete,
                "randn_tensor",
                lambda *a, pending=pending, **k: next(pending),
            )
        latents = torch.from_numpy(noise) * sch.init_noise_sigma
        theirs, i = [], 0
        for j, t in enumerate(sch.timesteps):
            eps = torch_model(sch.scale_model_input(latents, t), t)
            kwargs = {}
            if noise_mode == "variance_noise":
                kwargs = {"variance_noise": step_noise[i]}
            elif noise_mode == "eta1":
                kwargs = {"eta": 1.0, "variance_noise": step_noise[i]}
            latents = sch.step(eps, t, latents, **kwargs).prev_sample
            # Heun: only after a completed step (the last step to 0 is first order only).
            if getattr(sch, "state_in_first_order", True) or j == len(sch.timesteps) - 1:
                theirs.append(latents.numpy())
                i += 1
        assert len(theirs) == n

        x_init = noise * np.float32(sched.init_noise_sigma)
        _, ours = samplers.sample_jit(
            denoise, x_init, sched.sigmas, sched.timesteps, sampler, key, return_trajectory=True
        )
        ours = np.asarray(ours)
        if vp:  # diffusers' VP latent is ours / sqrt(sigma² + 1)
            ours = ours / np.sqrt(sched.sigmas[1:].astype(np.float64) ** 2 + 1).reshape(-1, 1, 1, 1, 1)
        for step, (a, b) in enumerate(zip(ours, theirs)):
            err = np.max(np.abs(a - b)) / np.max(np.abs(b))
            assert err < 1e-5, f"{case}, {n} steps, step {step}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------
# guidance


def _cond_model(calls):
    """A model whose output depends on the conditioning (a per-example vector `c` `[B, 4]`)."""

    def model(x_in, t, c):
        calls.append(x_in.shape[0])
        return 0.5 * x_in + 0.2 * c[:, :, None, None] + 0.001 * t[:, None, None, None]

    return model


def test_cfg_is_one_batched_call():
    calls = []
    base = denoisers.eps_denoiser(_cond_model(calls))
    x = _randn((3, 4, 2, 2), 0)
    cond, uncond = jnp.ones((3, 4)), jnp.zeros((3, 4))
    out = jax.jit(guidance.classifier_free_guidance(base))(x, 3.0, 500.0, guidance.Guided(cond, uncond, 7.5))
    assert calls == [6]
    d_c, d_u = jax.jit(base)(x, 3.0, 500.0, cond), jax.jit(base)(x, 3.0, 500.0, uncond)
    np.testing.assert_allclose(out, d_u + 7.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    # Without CFG: one call on the conditional half; the scale is ignored.
    calls.clear()
    plain = jax.jit(guidance.classifier_free_guidance(base, use_cfg=False))(
        x, 3.0, 500.0, guidance.Guided(cond, uncond, 7.5)
    )
    assert calls == [3]
    np.testing.assert_allclose(plain, d_c, rtol=1e-6)
    assert guidance.uses_cfg(5.0) and not guidance.uses_cfg(1.0) and not guidance.uses_cfg(0.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guidance_rescale_matches_diffusers(prediction):
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    model = _cond_model([])
    sigma, t, scale, phi = 2.5, 700.0, 6.0, 0.7
    x = _randn((2, 4, 3, 3), 1) * 2.0
    cond = _randn((2, 4), 2)
    uncond = jnp.zeros((2, 4))
    guided = guidance.classifier_free_guidance(denoisers.make_denoiser(model, prediction), rescale_space=prediction)
    out = guided(x, sigma, t, guidance.Guided(cond, uncond, scale, phi))
    # diffusers: CFG and rescale on the raw model output, then that output's denoised estimate.
    x_in = x / np.sqrt(sigma**2 + 1)
    tt = jnp.full((2,), t)
    p_c, p_u = (torch.from_numpy(np.array(model(x_in, tt, c))) for c in (cond, uncond))
    p = rescale_noise_cfg(p_u + scale * (p_c - p_u), p_c, guidance_rescale=phi).numpy()
    to_denoised = denoisers.eps_to_denoised if prediction == "epsilon" else denoisers.v_to_denoised
    np.testing.assert_allclose(out, to_denoised(x, sigma, p), rtol=1e-5, atol=1e-5)


def test_guidance_scale_is_traced():
    calls = []
    denoise = guidance.classifier_free_guidance(denoisers.eps_denoiser(_cond_model(calls)))
    sched = schedules.diffusers_euler(TABLE32, 5)
    x = _randn((2, 4, 2, 2), 0) * sched.init_noise_sigma
    cond, uncond = jnp.ones((2, 4)), jnp.zeros((2, 4))
    outs = [
        samplers.sample_jit(
            denoise, x, sched.sigmas, sched.timesteps, "euler", None, guidance.Guided(cond, uncond, jnp.float32(scale))
        )
        for scale in (5.0, 7.5, 1.5)
    ]
    assert len(calls) == 1  # traced once, whatever the scale
    assert not np.allclose(outs[0], outs[1])
    # New sigma values of the same length: no retrace either; a different step count does retrace.
    other = schedules.diffusers_euler(TABLE32, 5, "trailing")
    samplers.sample_jit(
        denoise, x, other.sigmas, other.timesteps, "euler", None, guidance.Guided(cond, uncond, jnp.float32(2.0))
    )
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------
# one scan, model traced once (twice for Heun); the registry


@pytest.mark.parametrize(
    "name,model_traces", [("euler", 1), ("heun", 2), ("dpmpp_2m", 1), ("dpmpp_2m_sde", 1), ("euler_a", 1), ("ddim", 1)]
)
def test_one_scan_model_traced_once(name, model_traces):
    calls = []
    denoise = denoisers.eps_denoiser(_cond_model(calls))
    sched = schedules.diffusers_euler(TABLE32, 20)
    x = jnp.zeros((1, 4, 2, 2))

    def run(x, sigmas, timesteps, key, c):
        return samplers.sample(denoise, x, sigmas, timesteps, name, key, c)

    jaxpr = jax.make_jaxpr(run)(x, sched.sigmas, sched.timesteps, jax.random.key(0), jnp.ones((1, 4)))
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert primitives.count("scan") == 1
    assert len(calls) == model_traces  # not once per step


def test_registry_and_turbo():
    assert set(samplers.SAMPLERS) == {"euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim"}
    with pytest.raises(KeyError, match="valid: euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, ddim"):
        samplers.get_sampler("lms")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        samplers.sample(gaussian_denoise, jnp.zeros((1, 4)), np.array([1.0, 0.0]), np.zeros(1), "euler_a")
    # SDXL-Turbo, 1 step: trailing t=999, init sigma_max (no +1), and the step lands on the denoiser output.
    sched, sampler = samplers.turbo_preset(TABLE32, 1)
    x = _randn((8, 4), 0) * sched.init_noise_sigma
    out = samplers.sample_jit(gaussian_denoise, x, sched.sigmas, sched.timesteps, sampler, jax.random.key(1))
    np.testing.assert_allclose(out, gaussian_denoise(x, sched.sigmas[0], 999.0, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_refiner_handoff_composes(name):
    # Base then refiner (no new noise) equals the whole schedule for single-step methods, Heun included:
    # its last base correction is evaluated at the handoff level with that level's timestep.
    def denoise(x, sigma, t, cond):  # depends on t, so a wrong timestep would show
        return gaussian_denoise(x, sigma, t, cond) + 1e-3 * t

    full = schedules.diffusers_euler(TABLE32, 40)
    base, refiner = schedules.split_for_refiner(full, 0.8)
    x = _randn((16, 4), 0) * full.init_noise_sigma
    whole = samplers.sample_jit(denoise, x, full.sigmas, full.timesteps, name)
    handed = samplers.sample_jit(denoise, x, base.sigmas, base.timesteps, name)
    done = samplers.sample_jit(denoise, handed, refiner.sigmas, refiner.timesteps, name)
    np.testing.assert_allclose(done, whole, rtol=1e-6, atol=1e-6)
