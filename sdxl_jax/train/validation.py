"""The validation pass of a run, with the EMA params: images for TensorBoard, and scalars.

    validate = make_validation(spec)                         # host-side inputs, one jitted program
    images, scalars = validate(frozen, state.ema_params)     # uint8 [N, H, W', 3], {name: float}

Diffusion (`sampling_validation`): a fixed list of prompts sampled with few steps; no scalars.

It runs the generation program of `generation.py` (the one `Pipeline` compiles) on the inputs that
`SamplingOptions.from_config(config.validation)` gives (`sampling.plan_and_inputs`, as `Pipeline` does),
so validation images are exactly what sampling the checkpoint with those options would give. Image i
uses seed `validation.seed + i` every time, so successive passes show the model changing, not the
noise. The negative branch is SDXL's default: zero text for the base, the empty prompt encoded with
aesthetic score 2.5 for the refiner.

The autoencoder (`reconstruction_validation`): `validation.num_images` fixed images (one batch of the
data config `validation.data`, read once at the start, every process reading all of them) encoded to
the posterior's mean and decoded; the scalars are their mean PSNR and SSIM (`image_quality`, on the
uint8 images the PNGs hold), and the images are the first 8 originals beside their reconstructions.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdxl_jax import generation
from sdxl_jax.diffusion import schedules
from sdxl_jax.models import AutoencoderKL
from sdxl_jax.sampling import SamplingOptions, plan_and_inputs
from sdxl_jax.sharding import tracing_context
from sdxl_jax.train.data import DATA_SOURCES
from sdxl_jax.train.image_quality import psnr, ssim
from sdxl_jax.train.lora import LoraSpec
from sdxl_jax.train.state import Models, model_params, place

SHOWN = 8  # reconstructions written as images (all `num_images` count in PSNR and SSIM)


def make_validation(spec):
    """The validation pass of the run `spec` (a `step.StepSpec`) describes."""
    if spec.config.objective == "autoencoder":
        return reconstruction_validation(spec.models, spec.config, spec.mesh)
    return sampling_validation(spec.models, spec.config, spec.mesh, spec.lora)


def validation_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """The autoencoder's validation images, uint8 `[num_images, H, W, 3]`: one batch of `validation.data`
    (seeded by `validation.seed`; give it one bucket, no flips, centre crops), read whole by this process."""
    v = config.validation
    data = DATA_SOURCES[v.data.source](v.data, seed=v.seed, global_batch_size=v.num_images, process_index=0,
                                       process_count=1)  # fmt: skip
    try:
        batch = next(data)
    except StopIteration:
        raise ValueError(f"validation.data ({v.data.source} {v.data.get('path', '')!r}) gave no batch of "
                         f"{v.num_images} images of one bucket") from None  # fmt: skip
    finally:
        if hasattr(data, "close"):
            data.close()
    if "images" not in batch:
        raise ValueError(f"validation.data gives {sorted(batch)}, no images")
    return np.asarray(batch["images"])


def reconstruction_validation(models: Models, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """`validate(frozen, trained) -> (uint8 [min(N, 8), H, 2W, 3] original | reconstruction, {"psnr",
    "ssim"})` for the autoencoder objective; `trained` the state's (EMA) params, the VAE's whole or its
    decoder side (`frozen["vae"]` the rest)."""
    images = validation_images(config)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    inputs = place(images, replicated)

    def program(frozen, trained, images):
        params = model_params(frozen, {"vae": trained["vae"]}, None)["vae"]
        vae = AutoencoderKL(models.vae)
        x = images.astype(jnp.float32) / 127.5 - 1.0
        x_rec = vae.apply({"params": params}, vae.apply({"params": params}, x, method="encode").mode(), method="decode")
        rec = jnp.round((jnp.clip(x_rec, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)
        return rec, {"psnr": jnp.mean(psnr(images, rec)), "ssim": jnp.mean(ssim(images, rec))}

    jitted = jax.jit(program, out_shardings=replicated)

    def validate(frozen: dict, trained: dict) -> tuple[np.ndarray, dict[str, float]]:
        with tracing_context(config, mesh):
            rec, scalars = jitted(frozen, trained, inputs)
        rec = np.asarray(rec.addressable_data(0))
        shown = np.concatenate([images[:SHOWN], rec[:SHOWN]], axis=2)
        return shown, {k: float(np.asarray(v.addressable_data(0))) for k, v in scalars.items()}

    return validate


def sampling_validation(
    models: Models, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, lora: LoraSpec | None
):
    """`validate(frozen, trained) -> (np.ndarray uint8 [N, H, W, 3], {})` for `config.validation` (the
    images replicated on `mesh`, so every process holds them); with LoRA the adapters (`trained`) are
    merged into the frozen kernels inside the program (`state.model_params`)."""
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

    def validate(frozen: dict, trained: dict) -> tuple[np.ndarray, dict]:
        with tracing_context(config, mesh):
            return np.asarray(jitted(frozen, trained, inputs).addressable_data(0)), {}

    return validate
