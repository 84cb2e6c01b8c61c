"""One generation call's options, described once: `SamplingOptions`, and the host-side inputs they become.

    options = SamplingOptions(height=32, width=32, steps=40, sampler="dpmpp_2m_sde", guidance_scale=4.0)
    images = pipe.generate(prompts, options=options, seed=0)        # Pipeline (pipeline.py)
    plan, inputs = plan_and_inputs(options, table, prompts, None, seeds)   # what it, and validation, compile

Everything that decides how a call samples (size, steps, sampler, schedule, guidance, the refiner split,
image-to-image strength, SDXL's micro-conditioning, the prompt mode) is a field of `SamplingOptions`, and
bad values (unknown names, no steps, empty sizes, two refiner modes at once) are errors when it is made,
before any weights are read. What depends on the models is checked where they are: sides a multiple of the
pipeline's `size_multiple`, a refiner for a refiner mode. The trainer's validation builds its options from
`config.validation`, sample.py from its config (`SamplingOptions.from_config`); `sample_config` is the
config sample.py reads (configs/sdxl_base.py, configs/demo.py's `sample`), its option fields taken from a
`SamplingOptions`.
"""

import dataclasses

import ml_collections
import numpy as np

from sdxl_jax import conditioning, generation
from sdxl_jax.diffusion import guidance, schedules
from sdxl_jax.generation import make_schedule
from sdxl_jax.tokenizer import MODES

# The options a sampling config holds, and of those the ones a config writes as 0 when unset (a ConfigDict
# cannot switch a None to a number from the command line).
CONFIG_FIELDS = (
    "height",
    "width",
    "steps",
    "sampler",
    "schedule",
    "guidance_scale",
    "guidance_rescale",
    "denoising_end",
    "refiner_strength",
    "aesthetic_score",
    "negative_aesthetic_score",
    "prompt_mode",
)
ZERO_IS_UNSET = ("denoising_end", "refiner_strength")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How one generation call samples: everything but the prompts, the seeds and given arrays.

    height, width: the images' size in pixels.
    steps, sampler (`samplers.SAMPLERS`), schedule (`generation.SCHEDULES`): the grid `make_schedule` builds.
    guidance_scale: classifier-free guidance (<= 1: no unconditional branch); guidance_rescale: phi of
        Lin et al.'s rescale (0: off).
    denoising_end: the base stops at this fraction of the schedule and the refiner finishes it (ensemble
        of experts, "handoff").
    refiner_strength: instead the base runs to the end and the refiner re-noises its image to this
        strength ("img2img", SDEdit) over `refiner_steps` (default `steps`) steps.
    refiner_guidance_scale: the refiner's CFG scale (default `guidance_scale`).
    strength: image-to-image strength, used when the call gives an init image.
    original_size, crop, target_size: SDXL's size micro-conditioning, (height, width) pairs; the sizes
        default to (height, width).
    aesthetic_score, negative_aesthetic_score: the refiner's conditioning of each branch.
    prompt_mode: "truncate" (77 tokens) or "chunked" (75-token chunks; `tokenizer.MODES`).
    """

    height: int = 1024
    width: int = 1024
    steps: int = 30
    sampler: str = "euler"
    schedule: str = "leading"
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0
    denoising_end: float | None = None
    refiner_strength: float | None = None
    refiner_steps: int | None = None
    refiner_guidance_scale: float | None = None
    strength: float = 0.8
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    prompt_mode: str = "truncate"

    def __post_init__(self):
        generation.check_schedule(self.sampler, self.schedule, self.steps)
        for name in ("height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.denoising_end is not None and self.refiner_strength is not None:
            raise ValueError("give either denoising_end (handoff) or refiner_strength (img2img), not both")
        if self.prompt_mode not in MODES:
            raise ValueError(f"unknown prompt_mode {self.prompt_mode!r}; valid: {', '.join(MODES)}")

    @property
    def refiner_mode(self) -> str | None:
        """None (the base alone), "handoff" (denoising_end) or "img2img" (refiner_strength)."""
        if self.denoising_end is not None:
            return "handoff"
        return None if self.refiner_strength is None else "img2img"

    def replace(self, **changes) -> "SamplingOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> "SamplingOptions":
        """The options a config holds (the fields it has; the rest keep their defaults), then `overrides`.
        A value <= 0 of a `ZERO_IS_UNSET` field means None."""
        fields = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        fields |= {name: None for name in ZERO_IS_UNSET if name in fields and not fields[name] > 0}
        return cls(**(fields | overrides))

    def config_fields(self) -> dict:
        """The `CONFIG_FIELDS` as a config holds them (an unset refiner split as 0.0)."""
        fields = {name: getattr(self, name) for name in CONFIG_FIELDS}
        return fields | {name: 0.0 for name in ZERO_IS_UNSET if fields[name] is None}


def sample_config(options: SamplingOptions | None = None, **settings) -> ml_collections.ConfigDict:
    """The config sample.py reads: the `CONFIG_FIELDS` of `options` (default `SamplingOptions()`) and the
    run's settings, then `settings`."""
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # required: set with --config.checkpoint=PATH
    c.refiner = ""  # a refiner checkpoint; used with denoising_end or refiner_strength
    c.dtype = "bf16"  # UNet + text encoders (the VAE decodes in fp32)
    c.loras = ""  # LoRA files merged into the base when loading: "PATH[:SCALE],..." (sample.py --lora, repeatable)
    c.lora_strict = True  # False: a LoRA's modules this model lacks are skipped with a warning, not an error
    c.vae = ""  # another VAE instead of the checkpoint's: a diffusers folder or an sdxl_vae.safetensors (--vae)
    # height, width, steps, sampler, schedule, guidance_scale, guidance_rescale, aesthetic_score,
    # negative_aesthetic_score, prompt_mode; denoising_end > 0: the base stops there and the refiner
    # finishes (ensemble of experts); refiner_strength > 0: instead the refiner re-noises the base's image
    c.update((options or SamplingOptions()).config_fields())
    c.negative_prompt = ""
    c.seed = 0
    c.n = 1  # images per prompt
    c.batch_size = 4  # images per compiled call (the last batch is padded to it: one compilation)
    c.compilation_cache = ""  # persistent XLA cache dir; "" = ~/.cache/sdxl_jax/xla, "none" = off
    c.outdir = "samples"
    c.update(settings)
    return c


# ---- host side: options -> the program's Plan and Inputs ----------------------------------------------


def stage_schedules(options: SamplingOptions, table: schedules.DDPMTable, img2img: bool = False):
    """(base schedule, refiner schedule or None): the full schedule, split for a handoff; the refiner's
    own `refiner_steps` schedule's tail for its img2img; the base's tail for an init image."""
    o = options
    base, refiner = make_schedule(o.sampler, o.schedule, o.steps, table), None
    if o.refiner_mode == "handoff":
        base, refiner = schedules.split_for_refiner(base, o.denoising_end)
    elif o.refiner_mode == "img2img":
        n = o.refiner_steps or o.steps
        refiner = schedules.tail(
            make_schedule(o.sampler, o.schedule, n, table), schedules.img2img_start(n, o.refiner_strength)
        )
    if img2img:
        base = schedules.tail(base, schedules.img2img_start(o.steps, o.strength))
    for name, part in (("base", base), ("refiner", refiner)):
        if part is not None and part.num_steps < 1:
            raise ValueError(f"the {name} gets no steps of {o.steps} (adjust denoising_end / strength / steps)")
    return base, refiner


def stage_inputs(
    prompts, negative_prompts, options: SamplingOptions, schedule: schedules.Schedule, scale: float, *, refiner: bool
) -> tuple[generation.StageInputs, generation.StagePlan]:
    """One stage's traced inputs (tokens, time ids, sigmas and timesteps `[n + 1]`) and static plan."""
    o = options
    prepared = conditioning.prepare_prompts(
        prompts, negative_prompts, refiner=refiner, height=o.height, width=o.width, original_size=o.original_size,
        crop_top_left=o.crop, target_size=o.target_size, aesthetic_score=o.aesthetic_score,
        negative_aesthetic_score=o.negative_aesthetic_score, mode=o.prompt_mode)  # fmt: skip
    timesteps = schedule.timesteps
    if timesteps.shape == (schedule.num_steps,):
        timesteps = np.concatenate([timesteps, np.zeros(1, np.float32)])
    inputs = generation.StageInputs(
        *prepared,
        np.asarray(schedule.sigmas, np.float32),
        timesteps.astype(np.float32),
        np.float32(scale),
        np.float32(o.guidance_rescale),
    )
    return inputs, generation.StagePlan(o.sampler, guidance.uses_cfg(scale), o.guidance_rescale > 0)


def plan_and_inputs(
    options: SamplingOptions,
    table: schedules.DDPMTable,
    prompts,
    negative_prompts,
    seeds,
    *,
    noise=None,
    init_latents=None,
    refiner_noise=None,
    refiner_first: bool = False,
) -> tuple[generation.Plan, generation.Inputs]:
    """The static Plan and traced Inputs of `generation.generate` for one call.

    seeds `[B]` uint32; noise, init_latents (image-to-image), refiner_noise: `[B, h, w, C]` or None (see
    `generation.Inputs`). refiner_first: the first stage's model is itself a refiner (a refiner's validation).
    """
    base_schedule, refiner_schedule = stage_schedules(options, table, img2img=init_latents is not None)
    base_inputs, base_plan = stage_inputs(
        prompts, negative_prompts, options, base_schedule, options.guidance_scale, refiner=refiner_first
    )
    ref_inputs = ref_plan = None
    if options.refiner_mode is not None:
        scale = options.guidance_scale if options.refiner_guidance_scale is None else options.refiner_guidance_scale
        ref_inputs, ref_plan = stage_inputs(prompts, negative_prompts, options, refiner_schedule, scale, refiner=True)
    plan = generation.Plan(base_plan, options.refiner_mode, ref_plan, init_latents is not None)
    inputs = generation.Inputs(
        base_inputs,
        seeds,
        noise,
        np.float32(base_schedule.init_noise_sigma or 1.0),
        init_latents,
        ref_inputs,
        refiner_noise,
    )
    return plan, inputs
