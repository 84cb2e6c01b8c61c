"""The validation pass: a fixed list of prompts sampled with the EMA params, few steps, as images.

    validate = make_validation(models, config)      # host-side tokens, one jitted sampler
    images = validate(params, key)                  # uint8 [N, H, W, 3]; params: {component: params}

The same seed every time, so successive passes show the model changing, not the noise. Base: the
unconditional branch has zero text (SDXL's empty negative prompt); refiner: the empty prompt encoded,
with aesthetic score 2.5 (and `validation.aesthetic_score` for the prompts).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdxl_jax import conditioning
from sdxl_jax.diffusion import denoisers, guidance, samplers, schedules
from sdxl_jax.mesh import tracing_context
from sdxl_jax.models import AutoencoderKL, UNet, from_latents
from sdxl_jax.tokenizer import tokenize_pair
from sdxl_jax.train_state import Models

NEGATIVE_AESTHETIC_SCORE = 2.5


def _time_ids(models: Models, size, n: int, score: float) -> jax.Array:
    if models.kind == "refiner":
        return conditioning.refiner_time_ids(size, (0, 0), score, n)
    return conditioning.base_time_ids(size, (0, 0), size, n)


def sample_images(params: dict, key: jax.Array, tokens, negative_tokens, *, models: Models,
                  v: ml_collections.ConfigDict, prediction: str, sigmas, timesteps, init_sigma: float) -> jax.Array:
    """uint8 `[N, H, W, 3]` for the prompts' `tokens` (`TokenPair`, `[N, 77]`)."""
    n, size = tokens.ids_g.shape[0], (v.height, v.width)
    encoders = models.encoders(params)
    dim = models.unet.time_id_embed_dim
    cond = conditioning.condition(encoders, tokens, _time_ids(models, size, n, v.aesthetic_score), dim=dim)
    if models.kind == "refiner":
        uncond = conditioning.condition(encoders, negative_tokens, _time_ids(models, size, n, NEGATIVE_AESTHETIC_SCORE), dim=dim)
    else:
        uncond = conditioning.condition(encoders, negative_tokens, _time_ids(models, size, n, 0.0), jnp.ones(n, bool), dim)
    unet = UNet(models.unet)
    model = lambda x, t, c: unet.apply({"params": params["unet"]}, x, t, c.context, c.y)  # noqa: E731
    use_cfg = guidance.uses_cfg(v.guidance_scale)
    denoise = guidance.classifier_free_guidance(denoisers.make_denoiser(model, prediction), use_cfg=use_cfg)
    f = models.vae.downsample_factor
    shape = (n, v.height // f, v.width // f, models.unet.in_channels)
    x = jax.random.normal(key, shape, jnp.float32) * init_sigma
    latents = samplers.sample(denoise, x, sigmas, timesteps, v.sampler, jax.random.fold_in(key, 1),
                              guidance.Guided(cond, uncond, jnp.float32(v.guidance_scale)))
    images = AutoencoderKL(models.vae).apply({"params": params["vae"]}, from_latents(latents, models.vae),
                                              method=AutoencoderKL.decode)
    return jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5).astype(jnp.uint8)


def make_validation(models: Models, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """`validate(params, key) -> np.ndarray uint8 [N, H, W, 3]` for `config.validation` (the images
    replicated on `mesh`, so every process holds them)."""
    v = config.validation
    tokens = tokenize_pair(list(v.prompts))
    negative = tokenize_pair([""] * len(v.prompts))
    table = schedules.scaled_linear_table(zero_terminal_snr=config.diffusion.zero_terminal_snr)
    sched = schedules.diffusers_euler(table, v.steps)
    fn = functools.partial(sample_images, models=models, v=v, prediction=config.diffusion.prediction,
                           sigmas=sched.sigmas, timesteps=sched.timesteps, init_sigma=sched.init_noise_sigma)
    jitted = jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def validate(params: dict, key: jax.Array) -> np.ndarray:
        with tracing_context(config, mesh):
            return np.asarray(jitted(params, key, tokens, negative).addressable_data(0))

    return validate
