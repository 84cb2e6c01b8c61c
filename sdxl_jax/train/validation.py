"""The validation pass: a fixed list of prompts sampled with the EMA params, few steps, as images.

    validate = make_validation(models, config, mesh, lora)   # host-side tokens, one jitted program
    images = validate(frozen, state.ema_params)              # uint8 [N, H, W, 3]

It runs the generation program of `generation.py` (the one `Pipeline` compiles) on the inputs that
`SamplingOptions.from_config(config.validation)` gives (`sampling.plan_and_inputs`, as `Pipeline` does),
so validation images are exactly what sampling the checkpoint with those options would give. Image i
uses seed `validation.seed + i` every time, so successive passes show the model changing, not the
noise. The negative branch is SDXL's default: zero text for the base, the empty prompt encoded with
aesthetic score 2.5 for the refiner.
"""

import jax
import ml_collections
import numpy as np

from sdxl_jax import generation
from sdxl_jax.diffusion import schedules
from sdxl_jax.sampling import SamplingOptions, plan_and_inputs
from sdxl_jax.sharding import tracing_context
from sdxl_jax.train.lora import LoraSpec
from sdxl_jax.train.state import Models, model_params


def make_validation(models: Models, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, lora: LoraSpec | None):
    """`validate(frozen, trained) -> np.ndarray uint8 [N, H, W, 3]` for `config.validation` (the images
    replicated on `mesh`, so every process holds them); with LoRA the adapters (`trained`) are merged
    into the frozen kernels inside the program (`state.model_params`)."""
    v = config.validation
    options = SamplingOptions.from_config(v)  # size, steps, sampler, schedule, guidance, aesthetic score
    table = schedules.scaled_linear_table(zero_terminal_snr=config.diffusion.zero_terminal_snr)
    seeds = (v.seed + np.arange(len(v.prompts))).astype(np.uint32)
    plan, inputs = plan_and_inputs(options, table, list(v.prompts), None, seeds, refiner_first=models.kind == "refiner")
    f = models.vae.downsample_factor
    latent_shape = (options.height // f, options.width // f, models.vae.latent_channels)

    def program(frozen, trained, inputs):
        params = model_params(frozen, trained, lora)
        stage = generation.Stage(models.unet, params["unet"], models.encoders(params), config.diffusion.prediction)
        all_models = generation.Models(stage, models.vae, params["vae"])
        return generation.generate(all_models, plan, inputs, latent_shape).images

    jitted = jax.jit(program, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def validate(frozen: dict, trained: dict) -> np.ndarray:
        with tracing_context(config, mesh):
            return np.asarray(jitted(frozen, trained, inputs).addressable_data(0))

    return validate
