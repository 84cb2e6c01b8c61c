"""The validation pass: a fixed list of prompts sampled with the EMA params, few steps, as images.

    validate = make_validation(models, config, mesh)   # host-side tokens, one jitted program
    images = validate(params)                          # uint8 [N, H, W, 3]; params: {component: params}

It runs the generation program of `generation.py` (the one `Pipeline` compiles), so validation images
are exactly what sampling the checkpoint would give. Image i uses seed `validation.seed + i` every
time, so successive passes show the model changing, not the noise. The negative branch is SDXL's
default: zero text for the base, the empty prompt encoded with aesthetic score 2.5 for the refiner.
"""

import jax
import ml_collections
import numpy as np

from sdxl_jax import conditioning, generation
from sdxl_jax.diffusion import guidance, schedules
from sdxl_jax.generation import make_schedule
from sdxl_jax.sharding import tracing_context
from sdxl_jax.train.state import Models


def make_validation(models: Models, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """`validate(params) -> np.ndarray uint8 [N, H, W, 3]` for `config.validation` (the images
    replicated on `mesh`, so every process holds them)."""
    v = config.validation
    prompts = conditioning.prepare_prompts(list(v.prompts), None, refiner=models.kind == "refiner", height=v.height,
                                           width=v.width, aesthetic_score=v.aesthetic_score)
    table = schedules.scaled_linear_table(zero_terminal_snr=config.diffusion.zero_terminal_snr)
    schedule = make_schedule(v.sampler, v.schedule, v.steps, table)
    stage_inputs = generation.StageInputs(*prompts, schedule.sigmas, schedule.timesteps, np.float32(v.guidance_scale),
                                          np.float32(0.0))
    seeds = (v.seed + np.arange(len(v.prompts))).astype(np.uint32)
    inputs = generation.Inputs(stage_inputs, seeds, init_noise_sigma=np.float32(schedule.init_noise_sigma))
    plan = generation.Plan(generation.StagePlan(v.sampler, guidance.uses_cfg(v.guidance_scale)))
    f = models.vae.downsample_factor
    latent_shape = (v.height // f, v.width // f, models.vae.latent_channels)

    def program(params, inputs):
        stage = generation.Stage(models.unet, params["unet"], models.encoders(params), config.diffusion.prediction)
        all_models = generation.Models(stage, models.vae, params["vae"])
        return generation.generate(all_models, plan, inputs, latent_shape).images

    jitted = jax.jit(program, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def validate(params: dict) -> np.ndarray:
        with tracing_context(config, mesh):
            return np.asarray(jitted(params, inputs).addressable_data(0))

    return validate
