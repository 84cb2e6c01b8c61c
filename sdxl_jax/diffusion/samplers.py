"""Samplers: one step signature, one `lax.scan` driver.

Every sampler step is

    step(denoise, state, x, now, nxt, key) -> (state, x)

with `now`/`nxt` the current and next `Level(sigma, t)` of the schedule, and `denoise(x, level)` the
denoiser with its conditioning bound (the model sees `level.t`). A step calls `denoise` as often as it
needs (Heun: twice, except on a last step to sigma 0), so first-order, second-order and multistep
methods share the signature; multistep methods keep their history in `state` (`init(x) -> state`).
Nothing mutates its inputs.

The driver `sample` runs the whole loop in one `lax.scan`, so the model is traced once (twice for
Heun) whatever the number of steps; jit it (or the pipeline function calling it) once per
(shape, steps, sampler). Its contract:

    x_init   the initial latent in sigma space, `noise * schedule.init_noise_sigma` (see schedules)
    sigmas   [n + 1] descending; timesteps [n]: the model's timestep at sigmas[:n], or [n + 1] with
             the timestep at sigmas[-1] too (else taken as 0; only Heun to a non-zero end uses it)
    key      step i draws its noise as `jax.random.normal(jax.random.split(key, n)[i], x.shape)`;
             or, for a typed key array `[B]` (one per example), example b's noise from
             `split(key[b], n)[i]` alone; deterministic samplers ignore it (it may be None)
    returns  the latent at sigmas[-1] (the clean latent when that is 0)

All of sigma arithmetic and the latent carried through the loop are float32.
Samplers (k-diffusion formulas; each matches its diffusers scheduler step for step):
    euler         Euler on the probability-flow ODE (EulerDiscrete)
    euler_a       Euler ancestral, eta = 1 (EulerAncestralDiscrete)
    heun          Heun, 2nd order, Euler on a last step to 0 (HeunDiscrete)
    dpmpp_2m      DPM-Solver++(2M), midpoint; 1st order on the first step and on a last step to 0
                  (DPMSolverMultistep, dpmsolver++, solver_order 2, final_sigmas_type "zero")
    dpmpp_2m_sde  its SDE variant, eta = 1 (DPMSolverMultistep, sde-dpmsolver++, midpoint)
    ddim          DDIM, eta = 0 (DDIMScheduler). In sigma space DDIM(eta) is exactly Euler ancestral
                  with the same eta, so eta = 0 is Euler.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sdxl_jax.diffusion import schedules
from sdxl_jax.diffusion.denoisers import Denoiser


class Level(NamedTuple):
    sigma: jax.Array  # float32 scalar
    t: jax.Array  # the model's timestep at this sigma


LevelDenoiser = Callable[[jax.Array, Level], jax.Array]
Step = Callable[[LevelDenoiser, Any, jax.Array, Level, Level, jax.Array], tuple[Any, jax.Array]]


class Sampler(NamedTuple):
    step: Step
    init: Callable[[jax.Array], Any]
    stochastic: bool


def _no_state(x):
    return ()


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def is_per_example(key) -> bool:
    """A typed key array `[B]`: one key per example (see `per_example_split`)."""
    return key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def per_example_split(keys: jax.Array, n: int) -> jax.Array:
    """`[B]` keys -> `[n, B]`: step i of example b uses `split(keys[b], n)[i]`."""
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, n))(keys), 0, 1)


def _noise(key, x):
    """Unit Gaussian noise like x. With one key per example each example's noise depends on its own
    key alone, so an image does not change with the batch it is generated in."""
    if is_per_example(key):
        return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(key)
    return jax.random.normal(key, x.shape, jnp.float32)


def ancestral_sigmas(sigma, sigma_next, eta):
    """Split a move to sigma_next into a deterministic move to sigma_down plus fresh noise sigma_up."""
    up = jnp.minimum(sigma_next, eta * jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return jnp.sqrt(sigma_next**2 - up**2), up


# ---------------------------------------------------------------------------------------------------
# single-step samplers


def euler_step(denoise, state, x, now, nxt, key):
    d = _to_d(x, now.sigma, denoise(x, now))
    return state, x + d * (nxt.sigma - now.sigma)


def heun_step(denoise, state, x, now, nxt, key):
    d = _to_d(x, now.sigma, denoise(x, now))
    dt = nxt.sigma - now.sigma
    x_euler = x + d * dt

    def correct():
        d_next = _to_d(x_euler, nxt.sigma, denoise(x_euler, nxt))
        return x + (d + d_next) / 2 * dt

    # The correction would divide by sigma_next = 0; a last step to 0 stays Euler (one model call).
    return state, jax.lax.cond(nxt.sigma > 0, correct, lambda: x_euler)


def euler_ancestral(eta: float = 1.0) -> Sampler:
    def step(denoise, state, x, now, nxt, key):
        d = _to_d(x, now.sigma, denoise(x, now))
        sigma_down, sigma_up = ancestral_sigmas(now.sigma, nxt.sigma, eta)
        return state, x + d * (sigma_down - now.sigma) + _noise(key, x) * sigma_up

    return Sampler(step, _no_state, stochastic=eta > 0)


def ddim(eta: float = 0.0) -> Sampler:
    """DDIM in sigma space: x' = denoised + sigma_down * eps + sigma_up * noise (VP DDIM's sigma_t with
    this eta, mapped into sigma space, is exactly the ancestral sigma_up)."""

    def step(denoise, state, x, now, nxt, key):
        denoised = denoise(x, now)
        eps = _to_d(x, now.sigma, denoised)
        sigma_down, sigma_up = ancestral_sigmas(now.sigma, nxt.sigma, eta)
        x = denoised + sigma_down * eps
        if eta > 0:
            x = x + _noise(key, x) * sigma_up
        return state, x

    return Sampler(step, _no_state, stochastic=eta > 0)


# ---------------------------------------------------------------------------------------------------
# multistep samplers


class History(NamedTuple):
    denoised: jax.Array  # the previous step's denoised estimate
    sigma: jax.Array  # the previous step's sigma
    valid: jax.Array  # False before the first step


def _history_init(x):
    return History(jnp.zeros_like(x, jnp.float32), jnp.float32(1.0), jnp.bool_(False))


def _multistep_denoised(state: History, denoised, now, nxt):
    """The midpoint 2nd-order combination `D + (D - D_prev) / (2 r)`, r = h_prev / h with h = log-sigma
    steps; first order (D itself) on the first step and on a last step to sigma 0."""
    second = state.valid & (nxt.sigma > 0)
    h = jnp.log(now.sigma) - jnp.log(jnp.where(second, nxt.sigma, 1.0))
    h_prev = jnp.log(jnp.where(second, state.sigma, 1.0)) - jnp.log(now.sigma)
    r = jnp.where(second, h_prev / h, 1.0)
    return jnp.where(second, denoised + (denoised - state.denoised) / (2 * r), denoised)


def dpmpp_2m_step(denoise, state, x, now, nxt, key):
    denoised = denoise(x, now)
    d = _multistep_denoised(state, denoised, now, nxt)
    ratio = nxt.sigma / now.sigma  # exp(-h)
    x = ratio * x + (1 - ratio) * d
    return History(denoised, now.sigma, jnp.bool_(True)), x


def dpmpp_2m_sde_step(denoise, state, x, now, nxt, key):
    denoised = denoise(x, now)
    d = _multistep_denoised(state, denoised, now, nxt)
    decay = (nxt.sigma / now.sigma) ** 2  # exp(-2h)
    x = decay * x + (1 - decay) * d + nxt.sigma * jnp.sqrt(1 - decay) * _noise(key, x)
    return History(denoised, now.sigma, jnp.bool_(True)), x


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(euler_step, _no_state, stochastic=False),
    "euler_a": euler_ancestral(1.0),
    "heun": Sampler(heun_step, _no_state, stochastic=False),
    "dpmpp_2m": Sampler(dpmpp_2m_step, _history_init, stochastic=False),
    "dpmpp_2m_sde": Sampler(dpmpp_2m_sde_step, _history_init, stochastic=True),
    "ddim": ddim(0.0),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def turbo_preset(table: schedules.DDPMTable, num_steps: int = 1) -> tuple[schedules.Schedule, Sampler]:
    """SDXL-Turbo: trailing spacing, 1–4 steps, Euler ancestral; run it without CFG
    (`classifier_free_guidance(..., use_cfg=False)` or the bare denoiser)."""
    return schedules.turbo(table, num_steps), SAMPLERS["euler_a"]


# ---------------------------------------------------------------------------------------------------
# the driver


def sample(
    denoise: Denoiser,
    x_init: jax.Array,
    sigmas,
    timesteps,
    sampler: Sampler | str,
    key: jax.Array | None = None,
    cond: Any = None,
    *,
    return_trajectory: bool = False,
):
    """Run `sampler` over the schedule from `x_init` (see the module docstring for the contract).

    `denoise(x, sigma, t, cond)`; `cond` is passed through to every call as a traced pytree (a
    `guidance.Guided` for a guided denoiser). With `return_trajectory`, also returns the latent after
    every step, `[n, *x.shape]`.
    """
    sampler = get_sampler(sampler) if isinstance(sampler, str) else sampler
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    n = sigmas.shape[0] - 1
    if sigmas.ndim != 1 or n < 1 or timesteps.shape not in ((n,), (n + 1,)):
        raise ValueError(f"need n + 1 sigmas and n (or n + 1) timesteps, got {sigmas.shape} and {timesteps.shape}")
    if sampler.stochastic:
        if key is None:
            raise ValueError("a stochastic sampler needs a PRNG key")
        keys = per_example_split(key, n) if is_per_example(key) else jax.random.split(key, n)
    else:
        keys = jnp.zeros((n,), jnp.uint32)  # unused placeholders: no PRNG work in deterministic loops
    if timesteps.shape == (n,):
        timesteps = jnp.concatenate([timesteps, jnp.zeros((1,), jnp.float32)])

    def at_level(x, level: Level):
        return denoise(x, level.sigma, level.t, cond)

    def body(carry, row):
        state, x = carry
        sigma, sigma_next, t, t_n, step_key = row
        state, x = sampler.step(at_level, state, x, Level(sigma, t), Level(sigma_next, t_n), step_key)
        return (state, x), (x if return_trajectory else None)

    x = jnp.asarray(x_init, jnp.float32)
    rows = (sigmas[:-1], sigmas[1:], timesteps[:-1], timesteps[1:], keys)
    (_, x), trajectory = jax.lax.scan(body, (sampler.init(x), x), rows)
    return (x, trajectory) if return_trajectory else x


sample_jit = jax.jit(sample, static_argnames=("denoise", "sampler", "return_trajectory"))
