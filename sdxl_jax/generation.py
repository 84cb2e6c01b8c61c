"""The generation program: token ids -> conditioning -> sampling loop(s) -> VAE decode, one pure function.

`generate(models, plan, inputs)` is what `Pipeline` jits: once per `Plan` (the static choices: sampler,
CFG on/off, refiner mode) and input shapes (batch, latent size, number of steps). Everything else is a
traced value — token ids, micro-conditioning, guidance scale, seeds, the sigma/timestep grid — so new
prompts, seeds and guidance never recompile.

Randomness is per image: image b draws everything from `jax.random.key(seeds[b])`, one stream per use
(`STREAMS`), so an image depends only on its seed, never on the batch or device count it runs in.

The stages, in sigma space (`x = x0 + sigma * eps`, see `diffusion/schedules.py`):

    start     txt2img: x = noise * init_noise_sigma;  img2img: x = add_noise(init_latents, noise, sigmas[0])
    base      sample over the base schedule (for a handoff it stops at a still-noisy sigma)
    refiner   "handoff": continue the same schedule with the refiner, no new noise (ensemble of experts);
              "img2img": noise the base's clean latent to the refiner schedule's first sigma (SDEdit)
    decode    unscale (`from_latents`) and decode with the VAE in its own dtype (fp32 by default)
"""

import dataclasses
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sdxl_jax import conditioning
from sdxl_jax.conditioning import Conditioning, TextEncoders
from sdxl_jax.diffusion import guidance, samplers, schedules
from sdxl_jax.diffusion.denoisers import make_denoiser
from sdxl_jax.models.pixel_space import FirstStageConfig, first_stage
from sdxl_jax.models.unet import UNet, UNetConfig
from sdxl_jax.models.vae import from_latents
from sdxl_jax.tokenizer import TokenPair

# fold_in constants of each image's random streams
STREAMS = {"noise": 0, "base_sampler": 1, "refiner_noise": 2, "refiner_sampler": 3}
REFINER_MODES = (None, "handoff", "img2img")


SCHEDULES = ("leading", "trailing", "linspace", "karras", "sgm", "turbo")
# Which diffusers scheduler family each sampler's sigma grid reproduces (see diffusion/schedules.py).
_EULER_FAMILY = ("euler", "euler_a", "heun")
_DPM_FAMILY = ("dpmpp_2m", "dpmpp_2m_sde")


def make_schedule(sampler: str, schedule: str, steps: int, table: schedules.DDPMTable) -> schedules.Schedule:
    """The sigma/timestep grid diffusers would use for this sampler and spacing ("karras": Karras sigmas
    on the leading grid; "sgm": Stability's own discretisation; "turbo": SDXL-Turbo's trailing 1–4 steps)."""
    check_schedule(sampler, schedule, steps)
    if schedule == "sgm":
        return schedules.sgm_legacy(table, steps)
    if schedule == "turbo":
        return schedules.turbo(table, steps)
    karras = schedule == "karras"
    spacing = "leading" if karras else schedule
    if sampler in _EULER_FAMILY:
        return schedules.diffusers_euler(table, steps, spacing, karras=karras)
    if sampler in _DPM_FAMILY:
        return schedules.diffusers_dpmsolver(table, steps, spacing, karras=karras)
    return schedules.diffusers_ddim(table, steps, spacing)


class UnknownNameError(ValueError, KeyError):
    """An unknown sampler or schedule name: a ValueError as every bad option is, and a KeyError as an
    unknown sampler has always been (`samplers.get_sampler`)."""

    __str__ = ValueError.__str__  # the message as written, not KeyError's quoted repr of it


def check_schedule(sampler: str, schedule: str, steps: int) -> None:
    """Errors for a sampler / schedule / step count that `make_schedule` cannot build (`SamplingOptions`
    checks its values here)."""
    if sampler not in samplers.SAMPLERS:
        raise UnknownNameError(f"unknown sampler {sampler!r}; valid: {', '.join(samplers.SAMPLERS)}")
    if schedule not in SCHEDULES:
        raise UnknownNameError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "karras" and sampler not in _EULER_FAMILY + _DPM_FAMILY:
        raise ValueError("DDIM has no Karras variant in diffusers; use leading, trailing or linspace")


@flax.struct.dataclass
class Stage:
    """One denoising model and its frozen text encoders (a pytree; configs are static)."""

    unet_cfg: UNetConfig = flax.struct.field(pytree_node=False)
    unet_params: Any
    encoders: TextEncoders
    prediction: str = flax.struct.field(pytree_node=False, default="epsilon")


@flax.struct.dataclass
class Models:
    """Everything the program computes with: the base stage, an optional refiner stage, the VAE."""

    base: Stage
    vae_cfg: FirstStageConfig = flax.struct.field(pytree_node=False)
    vae_params: Any
    refiner: Stage | None = None


@dataclasses.dataclass(frozen=True)
class StagePlan:
    sampler: str
    use_cfg: bool
    rescale: bool = False  # guidance rescale in the model's prediction space (needs traced phi)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static part of a generation call (hashable; a new value compiles a new program)."""

    base: StagePlan
    refiner_mode: str | None = None
    refiner: StagePlan | None = None
    img2img: bool = False  # the base starts from `init_latents` instead of pure noise
    decode_group: int | None = None  # None: decode the batch at once; g: g images at a time (see `decode`)

    def __post_init__(self):
        if self.refiner_mode not in REFINER_MODES:
            raise ValueError(f"refiner mode {self.refiner_mode!r} is not one of {REFINER_MODES}")
        if (self.refiner_mode is None) != (self.refiner is None):
            raise ValueError("a refiner mode needs a refiner StagePlan and vice versa")


class StageInputs(NamedTuple):
    """Traced inputs of one stage. Token arrays `[B, 77]` (or chunked `[B, C, 77]`); time ids `[B, 6|5]`;
    sigmas `[n + 1]`, timesteps `[n + 1]` (see `samplers.sample`); scalars float32."""

    tokens: TokenPair
    negative_tokens: TokenPair
    negative_zero: jax.Array  # [B] bool: the unconditional text is zeros (base, empty negative prompt)
    time_ids: jax.Array
    negative_time_ids: jax.Array
    sigmas: jax.Array
    timesteps: jax.Array
    guidance_scale: jax.Array
    guidance_rescale: jax.Array


class Inputs(NamedTuple):
    """seeds `[B]` uint32; noise `[B, h, w, C]` unit-variance or None (drawn from the seeds);
    init_noise_sigma scalar (txt2img); init_latents `[B, h, w, C]` scaled clean latents (img2img) or None;
    refiner_noise like noise, for refiner img2img."""

    base: StageInputs
    seeds: jax.Array
    noise: jax.Array | None = None
    init_noise_sigma: jax.Array | float = 1.0
    init_latents: jax.Array | None = None
    refiner: StageInputs | None = None
    refiner_noise: jax.Array | None = None


class Outputs(NamedTuple):
    images: jax.Array  # uint8 [B, H, W, 3]
    finite: jax.Array  # [B] bool: no NaN/inf anywhere in the decoded image
    latents: jax.Array  # [B, h, w, C] float32, the final (scaled) latents


def image_keys(seeds: jax.Array, stream: str) -> jax.Array:
    """`[B]` typed keys, one per image, for one of its random streams."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), STREAMS[stream]))(seeds)


def draw_noise(seeds: jax.Array, stream: str, shape: tuple[int, ...]) -> jax.Array:
    """`[B, *shape]` unit Gaussian noise; row b depends on seeds[b] alone."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(image_keys(seeds, stream))


def _model_fn(stage: Stage):
    def model(x_in, t, cond: Conditioning):
        return UNet(stage.unet_cfg).apply({"params": stage.unet_params}, x_in, t, cond.context, cond.y)

    return model


def _conditioning(stage: Stage, inputs: StageInputs, use_cfg: bool) -> guidance.Guided:
    dim = stage.unet_cfg.time_id_embed_dim
    cond = conditioning.condition(stage.encoders, inputs.tokens, inputs.time_ids, dim=dim)
    uncond = None
    if use_cfg:
        uncond = conditioning.condition(
            stage.encoders, inputs.negative_tokens, inputs.negative_time_ids, inputs.negative_zero, dim
        )
    return guidance.Guided(cond, uncond, inputs.guidance_scale, inputs.guidance_rescale)


def run_stage(stage: Stage, plan: StagePlan, inputs: StageInputs, x: jax.Array, keys: jax.Array) -> jax.Array:
    """Denoise x `[B, h, w, C]` (sigma space, at `inputs.sigmas[0]`) over the stage's schedule."""
    denoise = make_denoiser(_model_fn(stage), stage.prediction)
    guided = guidance.classifier_free_guidance(
        denoise, use_cfg=plan.use_cfg, rescale_space=stage.prediction if plan.rescale else None
    )
    cond = _conditioning(stage, inputs, plan.use_cfg)
    return samplers.sample(guided, x, inputs.sigmas, inputs.timesteps, plan.sampler, keys, cond)


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] float -> uint8, as diffusers' image processor does (clip, *255, round half to even)."""
    return jnp.round(jnp.clip(images / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def decode(
    vae_cfg: FirstStageConfig, vae_params, latents: jax.Array, group: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Scaled latents `[B, h, w, C]` -> (uint8 images `[B, H, W, 3]`, finite `[B]`); pixels with NaN/inf
    in any channel come out black.

    group: decode `group` images at a time in a `lax.map`, the batch (a multiple of `group`) viewed as
    `[group, B / group]` and mapped along its second axis, so that with `group` = the data-axis size
    every device decodes its own images one after another. The decoder's activations at 1024² are
    0.5 GiB per image and tensor; a whole batch of them is the sampling program's largest temporary.
    None: the whole batch at once."""

    def run(z):
        images = first_stage(vae_cfg).apply({"params": vae_params}, from_latents(z, vae_cfg), method="decode")
        pixel_ok = jnp.all(jnp.isfinite(images), axis=-1, keepdims=True)
        return to_uint8(jnp.where(pixel_ok, images, -1.0)), jnp.all(pixel_ok, axis=(1, 2, 3))  # non-finite: black

    batch = latents.shape[0]
    if group is None or group >= batch:
        return run(latents)
    if batch % group:
        raise ValueError(f"decode group {group} does not divide the batch {batch}")
    steps = batch // group
    grouped = latents.reshape(group, steps, *latents.shape[1:]).swapaxes(0, 1)  # [steps, group, h, w, C]
    images, finite = jax.lax.map(run, grouped)
    images = images.swapaxes(0, 1).reshape(batch, *images.shape[2:])
    return images, finite.swapaxes(0, 1).reshape(batch)


def initial_latents(plan: Plan, inputs: Inputs, shape: tuple[int, ...]) -> jax.Array:
    noise = inputs.noise if inputs.noise is not None else draw_noise(inputs.seeds, "noise", shape)
    if plan.img2img:
        return schedules.add_noise(inputs.init_latents, noise, inputs.base.sigmas[0])
    return noise * inputs.init_noise_sigma


def denoise_all(models: Models, plan: Plan, inputs: Inputs, shape: tuple[int, ...]) -> jax.Array:
    """The final scaled latents `[B, *shape]` (shape: one image's latent `(h, w, C)`)."""
    x = initial_latents(plan, inputs, shape)
    x = run_stage(models.base, plan.base, inputs.base, x, image_keys(inputs.seeds, "base_sampler"))
    if plan.refiner_mode is None:
        return x
    if plan.refiner_mode == "img2img":
        noise = inputs.refiner_noise
        if noise is None:
            noise = draw_noise(inputs.seeds, "refiner_noise", shape)
        x = schedules.add_noise(x, noise, inputs.refiner.sigmas[0])
    return run_stage(models.refiner, plan.refiner, inputs.refiner, x, image_keys(inputs.seeds, "refiner_sampler"))


def generate(models: Models, plan: Plan, inputs: Inputs, latent_shape: tuple[int, int, int]) -> Outputs:
    """The whole program (jit with `plan` and `latent_shape` static)."""
    latents = denoise_all(models, plan, inputs, latent_shape)
    images, finite = decode(models.vae_cfg, models.vae_params, latents, plan.decode_group)
    return Outputs(images, finite, latents)


# How XLA:CPU compiles the program. XLA:CPU runs bf16/fp16 matmuls and convolutions in fp32, converting
# each weight first. Its default (concurrency-optimised) scheduler runs those converts ahead of the layers
# and loop-invariant code motion lifts them out of the sampler's loop, so an fp32 copy of every weight
# is alive at once: 12.5 GiB of temporaries in SDXL base's bf16 program at 1024², batch 1, against 3.9
# with the memory-optimised scheduler and no code motion (what `memory_analysis()` reports).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
}


def compiler_options(platform: str) -> dict | None:
    """The XLA options the generation program is compiled with on `platform` (None: XLA's defaults)."""
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


def input_shardings(inputs: Inputs, mesh: jax.sharding.Mesh):
    """How the program takes `inputs` on a mesh with a `data` axis: per-example arrays split along
    `data`, the schedules (`sigmas`, `timesteps`) and scalars replicated."""
    split, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    sigma_fields = {"sigmas", "timesteps"}

    def sharding_of(path, x):
        name = getattr(path[-1], "name", None)
        if np.ndim(x) == 0 or name in sigma_fields:
            return whole
        return split

    return jax.tree_util.tree_map_with_path(sharding_of, inputs)
