"""Noise schedules: the discrete DDPM training table and the sigma/timestep grids samplers walk.

Everything here runs once on the host in numpy (float64 arithmetic), and hands back float32 arrays.
A `Schedule` is what a sampler needs:

    sigmas     [n + 1] float32, descending; sigmas[-1] is the final noise level (0 unless stated)
    timesteps  [n]     float32, the model's timestep at sigmas[i] (possibly fractional); [n + 1] when
               the timestep at a non-zero final sigma is known and differs from 0 (a base model's part
               of a handoff), so that a sampler evaluating the model there (Heun) conditions it right
    init_noise_sigma   float: the initial latent is `randn * init_noise_sigma`; None for a schedule's tail

All samplers work in "sigma space" (k-diffusion / EDM): `x = x0 + sigma * eps`, model input
`x / sqrt(sigma² + 1)`. diffusers' Euler-family schedulers live in this space too, so their latents are
ours as they are. DPMSolverMultistep and DDIM live in the variance-preserving space
`x_vp = x / sqrt(sigma² + 1)` with unit initial noise; their `init_noise_sigma` here is
`sqrt(sigma_0² + 1)`, so `randn * init_noise_sigma` is exactly diffusers' latent mapped into sigma space.

Which diffusers scheduler each builder reproduces (after `set_timesteps(n)`):
    `diffusers_euler`      EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete (Heun: de-interleaved)
    `diffusers_dpmsolver`  DPMSolverMultistep (its "leading"/"linspace" grids differ from Euler's)
    `diffusers_ddim`       DDIM
    `sgm_legacy`           sgm's LegacyDDPMDiscretization (float64 table, timesteps quantised)
"""

from typing import Literal, NamedTuple

import numpy as np

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS = ("leading", "trailing", "linspace")

# SDXL's training schedule ("scaled linear"), shared by base and refiner.
SDXL_BETA_START = 0.00085
SDXL_BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000
KARRAS_RHO = 7.0
# diffusers' stand-in for alphabar = 0 at the last step when rescaling to zero terminal SNR
# (keeps sigma_max finite: ~4096).
ZERO_SNR_ALPHABAR = 2.0**-24


class DDPMTable(NamedTuple):
    """The training schedule, indexed by integer timestep 0 .. N-1 (float64 unless built otherwise)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sigmas: np.ndarray  # sqrt((1 - alphabar) / alphabar), ascending in t

    @property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas.astype(np.float64))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)


class Schedule(NamedTuple):
    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float | None

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last alphabar is exactly 0 (Lin et al. 2023, Algorithm 1), first alphabar unchanged."""
    root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alphabar = root**2
    alphas = np.concatenate([alphabar[:1], alphabar[1:] / alphabar[:-1]])
    return 1.0 - alphas


def scaled_linear_table(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = SDXL_BETA_START,
    beta_end: float = SDXL_BETA_END,
    *,
    zero_terminal_snr: bool = False,
    diffusers_float32: bool = False,
) -> DDPMTable:
    """`betas = linspace(sqrt(beta_start), sqrt(beta_end), N)**2`, alphabar = cumprod(1 - betas).

    float64 throughout by default (sgm's table). `diffusers_float32=True` mimics diffusers' float32
    torch table (betas and 1 - betas rounded to float32, cumprod accumulated in float64 as torch does,
    then rounded): its sigmas then agree with diffusers' to ~4e-7 relative instead of ~1.3e-5.
    `zero_terminal_snr` rescales the betas and then sets the last alphabar to 2**-24, as diffusers'
    sigma-space schedulers do.
    """
    roots = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64)
    if diffusers_float32:
        roots = roots.astype(np.float32)
    betas = roots**2
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
        if diffusers_float32:
            betas = betas.astype(np.float32)
    alphas = (1 - betas).astype(betas.dtype)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64))
    if diffusers_float32:
        alphas_cumprod = alphas_cumprod.astype(np.float32)
    if zero_terminal_snr:
        alphas_cumprod[-1] = ZERO_SNR_ALPHABAR
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return DDPMTable(np.asarray(betas), alphas_cumprod, sigmas)


# ---------------------------------------------------------------------------------------------------
# timestep <-> sigma


def timestep_to_sigma(timesteps, table: DDPMTable) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps: linear interpolation of the table in sigma (diffusers)."""
    t = np.asarray(timesteps, np.float64)
    return np.interp(t, np.arange(table.num_train_timesteps), table.sigmas.astype(np.float64))


def sigma_to_timestep(sigmas, table: DDPMTable) -> np.ndarray:
    """Fractional timestep whose sigma is `sigmas`: linear interpolation in log-sigma, clipped to the
    table's range (diffusers' `_sigma_to_t`). Not the exact inverse of `timestep_to_sigma`."""
    log_table = table.log_sigmas
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    # Index of the last table entry at or below each sigma, kept one short of the end.
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1 - w) * low + w * (low + 1)


def nearest_timestep(sigmas, table: DDPMTable) -> np.ndarray:
    """Integer timestep whose sigma is nearest (sgm's `DiscreteDenoiser` quantisation, in sigma)."""
    s = np.asarray(sigmas, np.float64)
    return np.abs(s[..., None] - table.sigmas.astype(np.float64)).argmin(axis=-1)


# ---------------------------------------------------------------------------------------------------
# building blocks


def spaced_timesteps(
    n: int, spacing: Spacing, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, steps_offset: int = 1
) -> np.ndarray:
    """The n descending timesteps of diffusers' Euler-family/DDIM spacings (float64; "linspace" is
    fractional). `steps_offset` only affects "leading" (SDXL: leading with offset 1 -> 981, 961, …, 1)."""
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    big = num_train_timesteps
    if spacing == "leading":
        return (np.arange(n) * (big // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(big, 0, -big / n)) - 1.0
    if spacing == "linspace":
        return np.linspace(0, big - 1, n)[::-1].copy()
    raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, equally spaced in sigma**(1/rho) (Karras et al. 2022)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _finish(sigmas, timesteps, final_sigma: float, init_noise_sigma: float | None) -> Schedule:
    sigmas = np.concatenate([np.asarray(sigmas, np.float64), [final_sigma]]).astype(np.float32)
    return Schedule(sigmas, np.asarray(timesteps).astype(np.float32), init_noise_sigma)


def _vp_init(sigmas: np.ndarray) -> float:
    """Unit-variance VP noise mapped into sigma space: times sqrt(sigma_0² + 1)."""
    return float(np.sqrt(np.float64(sigmas[0]) ** 2 + 1))


# ---------------------------------------------------------------------------------------------------
# schedules matching the reference implementations


def sgm_legacy(table: DDPMTable, n: int) -> Schedule:
    """sgm's LegacyDDPMDiscretization: integer timesteps `linspace(N-1, 0, n, endpoint=False)` truncated
    (50 steps: 999, 979, …, 19), their table sigmas, then 0. Initial latent `randn * sqrt(1 + sigma_0²)`."""
    big = table.num_train_timesteps
    if n >= big:
        timesteps = np.arange(big)[::-1]
    else:
        timesteps = np.linspace(big - 1, 0, n, endpoint=False).astype(int)
    sigmas = table.sigmas.astype(np.float64)[timesteps]
    return _finish(sigmas, timesteps, 0.0, _vp_init(sigmas.astype(np.float32)))


def diffusers_euler(
    table: DDPMTable, n: int, spacing: Spacing = "leading", *, steps_offset: int = 1, karras: bool = False
) -> Schedule:
    """diffusers' Euler / Euler-ancestral / Heun grid.

    Sigmas interpolated (linearly) at the spaced timesteps. With `karras`, n Karras sigmas between the
    *spaced* grid's first and last sigma (not the table's ends) and fractional timesteps from
    `sigma_to_timestep`. `init_noise_sigma`: sigma_0 for "linspace"/"trailing", sqrt(sigma_0² + 1) for
    "leading" (diffusers' rule).
    """
    timesteps = spaced_timesteps(n, spacing, table.num_train_timesteps, steps_offset)
    sigmas = timestep_to_sigma(timesteps, table)
    if karras:
        sigmas = karras_sigmas(n, sigmas[-1], sigmas[0])
        timesteps = sigma_to_timestep(sigmas, table)
    sigma_0 = np.float64(np.float32(sigmas[0]))
    init = sigma_0 if spacing in ("linspace", "trailing") else np.sqrt(sigma_0**2 + 1)
    return _finish(sigmas, timesteps, 0.0, float(init))


def diffusers_dpmsolver(
    table: DDPMTable, n: int, spacing: Spacing = "leading", *, steps_offset: int = 1, karras: bool = False
) -> Schedule:
    """diffusers' DPMSolverMultistep grid (final_sigmas_type "zero", lambda_min_clipped -inf).

    Its integer timesteps come from n + 1 points with the last dropped: "leading" uses
    `N // (n + 1)` strides (50 steps: 951, 932, …, 20), "linspace" rounds `linspace(0, N-1, n + 1)`.
    With `karras`, Karras sigmas between the *table's* ends and timesteps rounded to integers.
    """
    big = table.num_train_timesteps
    if spacing == "leading":
        timesteps = (np.arange(n + 1) * (big // (n + 1)))[::-1][:-1] + steps_offset
    elif spacing == "linspace":
        timesteps = np.round(np.linspace(0, big - 1, n + 1))[::-1][:-1]
    else:
        timesteps = spaced_timesteps(n, spacing, big, steps_offset)
    timesteps = np.asarray(timesteps, np.float64)
    if karras:
        sigmas = karras_sigmas(n, float(table.sigmas[0]), float(table.sigmas[-1]))
        timesteps = np.round(sigma_to_timestep(sigmas, table))
    else:
        sigmas = timestep_to_sigma(timesteps, table)
    return _finish(sigmas, timesteps, 0.0, _vp_init(np.float32(sigmas)))


def diffusers_ddim(
    table: DDPMTable, n: int, spacing: Spacing = "leading", *, steps_offset: int = 1, set_alpha_to_one: bool = False
) -> Schedule:
    """diffusers' DDIM grid: integer timesteps (linspace rounded), table sigmas, and a final sigma of 0
    (`set_alpha_to_one`) or the table's sigma at t=0 (SDXL's config: 0.0292).

    diffusers' DDIM steps from t to `t - N // n`; that is the next grid point for "leading" and for
    "trailing" with n dividing N, which are the grids reproduced exactly. diffusers returns the final
    latent in VP space: with a non-zero final sigma multiply ours by `1 / sqrt(sigmas[-1]² + 1)`.
    """
    timesteps = spaced_timesteps(n, spacing, table.num_train_timesteps, steps_offset)
    timesteps = np.round(timesteps)
    if timesteps.max() >= table.num_train_timesteps:
        raise ValueError(
            f"DDIM timestep {timesteps.max():.0f} is past the table (steps_offset too large for {n} steps)"
        )
    sigmas = table.sigmas.astype(np.float64)[timesteps.astype(int)]
    final = 0.0 if set_alpha_to_one else float(table.sigmas[0])
    return _finish(sigmas, timesteps, final, _vp_init(np.float32(sigmas)))


def turbo(table: DDPMTable, n: int = 1) -> Schedule:
    """SDXL-Turbo: 1–4 steps, "trailing" spacing (1 step: t = 999), to be run with Euler ancestral and
    no classifier-free guidance."""
    if not 1 <= n <= 4:
        raise ValueError(f"SDXL-Turbo is distilled for 1–4 steps, got {n}")
    return diffusers_euler(table, n, "trailing")


# ---------------------------------------------------------------------------------------------------
# cutting one schedule into parts: base -> refiner, and image-to-image


def timestep_cutoff(fraction: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """diffusers' discrete cutoff for `denoising_end` / `denoising_start`: round(N - N * fraction)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the handoff fraction must lie strictly between 0 and 1, got {fraction}")
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def tail(schedule: Schedule, start: int) -> Schedule:
    """Steps `start ..` of a schedule (no new initial noise: init_noise_sigma is None)."""
    return Schedule(schedule.sigmas[start:], schedule.timesteps[start:], None)


def split_for_refiner(
    schedule: Schedule, denoising_end: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[Schedule, Schedule]:
    """Ensemble of experts: the base keeps the steps with `t >= cutoff` and stops at the next sigma
    (still noisy); the refiner continues the same schedule from there without adding noise.

    For first-order and multistep samplers this is exactly diffusers' `denoising_end` (base) and
    `denoising_start` (refiner) with the same fraction (40 steps at 0.8: base 32 steps, refiner 8).
    (diffusers' Heun scheduler interleaves its timesteps and cuts mid-step; ours cut between steps.)
    """
    cutoff = timestep_cutoff(denoising_end, num_train_timesteps)
    k = int(np.sum(schedule.timesteps >= cutoff))
    # The base also carries the timestep at its final (handoff) sigma: see `Schedule`.
    base = Schedule(schedule.sigmas[: k + 1], schedule.timesteps[: k + 1], schedule.init_noise_sigma)
    return base, tail(schedule, k)


def img2img_start(n: int, strength: float) -> int:
    """First step of an n-step schedule that image-to-image with `strength` runs (diffusers'
    `get_timesteps`): it noises the clean latent to `sigmas[start]` and denoises the remaining steps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    return max(n - min(int(n * strength), n), 0)


def sgm_img2img_start(n: int, strength: float) -> int:
    """sgm's `Img2ImgDiscretizationWrapper`: keep the lowest `max(int(strength * (n + 1)), 1)` of the n + 1
    sigmas (trailing 0 included). SDXL demo refiner, 50 steps at 0.15: the last 6 steps, from sigma 0.387."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    return (n + 1) - max(int(strength * (n + 1)), 1)


def add_noise(x0, noise, sigma):
    """Noise a clean latent to level `sigma` in sigma space: x0 + sigma * noise (diffusers' `add_noise`
    for any of the schedulers above, mapped into sigma space)."""
    return x0 + sigma * noise
