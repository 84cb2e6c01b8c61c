"""The training step as a pure function: (state, frozen params, global batch) -> (state, metrics).

    batch (see `sdxl_jax.data.synthetic` for the contract) -> latents x0 [B, h, w, 4] and conditioning
    (context [B, 77, D], y [B, adm]) -> noise, timesteps t ~ U[t_min, t_max) -> x_t -> UNet -> loss
    -> gradients -> clip, AdamW (MultiSteps), EMA -> the next state; a non-finite loss or gradient
    leaves the state as it was (only `step` and the skip counters move).

Everything random comes from `fold_in(state.rng, state.step)`, so a step's result depends on the
state and the batch alone: resuming from a checkpoint replays the same steps bit for bit, and with
JAX's partitionable threefry the numbers do not depend on how the batch is sharded.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdxl_jax import conditioning
from sdxl_jax.diffusion import losses, schedules
from sdxl_jax.flops import jaxpr_flops
from sdxl_jax.models import DiagonalGaussian, UNet, to_latents
from sdxl_jax.models.pixel_space import first_stage
from sdxl_jax.tokenizer import TokenPair
from sdxl_jax.train_state import Models, TrainState, ema_decay


def alphas_cumprod(diffusion: ml_collections.ConfigDict) -> np.ndarray:
    """SDXL's training table alphabar[t], float32 `[1000]`."""
    return schedules.scaled_linear_table(zero_terminal_snr=diffusion.zero_terminal_snr).alphas_cumprod.astype(np.float32)


def time_ids(models: Models, batch: dict) -> jax.Array:
    """Micro-conditioning `[B, 6]` (base) or `[B, 5]` (refiner) from the batch's sizes, crops, scores."""
    b = batch["original_size"].shape[0]
    if models.kind == "refiner":
        return conditioning.refiner_time_ids(batch["original_size"], batch["crop_top_left"], batch["aesthetic_score"], b)
    return conditioning.base_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"], b)


def encode_batch(models: Models, params: dict, batch: dict, key: jax.Array) -> tuple[jax.Array, conditioning.Conditioning]:
    """(latents x0 fp32 `[B, H/8, W/8, C]`, conditioning) for a batch of images or cached latents.

    images uint8 `[B, H, W, 3]` -> [-1, 1] -> VAE posterior -> a sample (key) -> x scaling factor;
    latent_moments `[B, H/8, W/8, 2C]` skip the encoder. Text goes through the text encoders, or comes
    cached as `context`/`pooled`; `drop_text` zeroes both text parts of those examples.
    """
    if "latent_moments" in batch:
        posterior = DiagonalGaussian.from_moments(batch["latent_moments"])
    else:
        images = batch["images"].astype(jnp.float32) / 127.5 - 1.0
        posterior = first_stage(models.vae).apply({"params": params["vae"]}, images, method="encode")
    x0 = to_latents(posterior.sample(key), models.vae)
    if "context" in batch:
        context, pooled = batch["context"], batch["pooled"]
    else:
        tokens = TokenPair(batch["ids_l"], batch["ids_g"], batch["eot_l"], batch["eot_g"])
        context, pooled = conditioning.encode_text(models.encoders(params), tokens)
    context, pooled = conditioning.drop_text(context, pooled, batch["drop_text"])
    y = conditioning.vector_conditioning(pooled, time_ids(models, batch), models.unet.time_id_embed_dim)
    return x0, conditioning.Conditioning(context, y)


def diffusion_loss(model, diffusion: ml_collections.ConfigDict, x0, cond, key) -> tuple[jax.Array, dict]:
    """The weighted MSE of one batch: (loss, {"t", "noise", "weights": per example}).

    model(x_t, t, cond) -> eps or v, `[B, h, w, C]`; noise = N(0, 1) + offset_noise * N(0, 1) per
    (example, channel); t integers in [t_min, t_max); x_t = sqrt(ab) x0 + sqrt(1 - ab) noise;
    target eps, v or x0; weights per `diffusion.weighting` (see `losses.loss_weights`); t shifted toward
    high noise by `diffusion.timestep_shift` (`losses.sample_timesteps`).
    """
    k_noise, k_offset, k_t = jax.random.split(key, 3)
    b, c = x0.shape[0], x0.shape[-1]
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    if diffusion.offset_noise:
        noise = noise + diffusion.offset_noise * jax.random.normal(k_offset, (b, 1, 1, c), jnp.float32)
    t = losses.sample_timesteps(k_t, b, diffusion.t_min, diffusion.t_max, diffusion.timestep_shift)
    ab = jnp.asarray(alphas_cumprod(diffusion))[t]
    out = model(losses.noisy_latents(x0, noise, ab), t, cond)
    weights = losses.loss_weights(losses.snr(ab), diffusion.weighting, diffusion.prediction, diffusion.min_snr_gamma)
    loss = losses.diffusion_loss(out, losses.target(x0, noise, ab, diffusion.prediction), weights)
    return loss, {"t": t, "noise": noise, "weights": weights}


def _select(keep_new, new, old):
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def train_step(state: TrainState, frozen: dict, batch: dict, *, models: Models, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, config: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
    """One batch. Returns the next state and scalar metrics (loss, grad_norm, lr, finite, updates, skipped)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_vae, k_loss = jax.random.split(key)

    def loss_fn(params):
        everything = frozen | params
        x0, cond = encode_batch(models, everything, batch, k_vae)
        unet = lambda x_t, t, c: UNet(models.unet).apply({"params": everything["unet"]}, x_t, t, c.context, c.y)  # noqa: E731
        return diffusion_loss(unet, config.diffusion, x0, cond, k_loss)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    applied = finite
    if isinstance(tx, optax.MultiSteps):
        applied = finite & (opt_state.mini_step == 0)  # the accumulation window closed: params moved
    decay = ema_decay(config.ema, state.updates)
    ema = jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), state.ema_params, params)
    new = state.replace(
        step=state.step + 1,
        updates=state.updates + applied.astype(jnp.int32),
        params=_select(finite, params, state.params),
        opt_state=_select(finite, opt_state, state.opt_state),
        ema_params=_select(applied, ema, state.ema_params),
        skipped=jnp.where(finite, 0, state.skipped + 1),
        skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
    )
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.updates), "finite": finite,
        "updates": new.updates, "skipped": new.skipped, "skipped_total": new.skipped_total,
        "ema_decay": decay, "t_mean": aux["t"].astype(jnp.float32).mean(),
    }  # fmt: skip
    return new, metrics


def make_train_step(models: Models, tx, lr_schedule, config, state_shardings, frozen_shardings, batch_sharding):
    """`jax.jit` of `train_step` with the state donated, in/out shardings fixed, metrics replicated.

    batch_sharding: one `NamedSharding` (batch axis split) applied to every batch entry.
    """
    step = functools.partial(train_step, models=models, tx=tx, lr_schedule=lr_schedule, config=config)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def without_remat(models: Models) -> Models:
    """The same networks keeping every activation: the program whose FLOPs are the model FLOPs (MFU
    does not count the forward passes that remat repeats)."""
    return dataclasses.replace(models, unet=models.unet.replace(remat="none"))


def model_flops(models: Models, tx, lr_schedule, config, state_shardings, frozen_shardings, batch_sharding,
                state, frozen, batch) -> float:
    """Model FLOPs of one whole step (all devices) for these (possibly abstract) inputs: the matmuls and
    convolutions of the step traced without remat (`flops.jaxpr_flops`); nothing is compiled."""
    counted = make_train_step(without_remat(models), tx, lr_schedule, config, state_shardings, frozen_shardings,
                              batch_sharding)
    return jaxpr_flops(counted.trace(state, frozen, batch).jaxpr)


class CompiledSteps:
    """The jitted step compiled ahead of time once per batch signature (bucket), with its model FLOPs
    (`model_flops`): `steps(state, frozen, batch)`, then `last_flops` (the whole step, all devices) and
    `last_compiled` (whether that call compiled, i.e. its time is not a step time). Traced inside
    `context()` (`mesh.tracing_context`: whether the models' activation constraints take effect).

    jitted: `make_train_step(models, tx, lr_schedule, config, *shardings)`; `count(state, frozen, batch)`
    is `model_flops` with the same arguments bound, or None when the models have no remat: the step's
    own trace is then the one to count (no second trace).
    """

    def __init__(self, jitted, context, count):
        self.jitted, self.context, self.count, self.compiled, self.flops = jitted, context, count, {}, {}
        self.last_flops, self.last_compiled = None, False

    @staticmethod
    def signature(batch: dict) -> tuple:
        return tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))

    def __call__(self, state, frozen, batch):
        key = self.signature(batch)
        self.last_compiled = key not in self.compiled
        if self.last_compiled:
            with self.context():
                traced = self.jitted.trace(state, frozen, batch)
                self.compiled[key] = traced.lower().compile()
                self.flops[key] = jaxpr_flops(traced.jaxpr) if self.count is None else self.count(state, frozen, batch)
        self.last_flops = self.flops[key]
        return self.compiled[key](state, frozen, batch)


def compiled_steps(models: Models, tx, lr_schedule, config, state_shardings, frozen_shardings, batch_sharding,
                   context) -> CompiledSteps:
    """The trainer's step: `CompiledSteps` of `make_train_step` with these arguments."""
    args = (tx, lr_schedule, config, state_shardings, frozen_shardings, batch_sharding)
    jitted = make_train_step(models, *args)
    count = None if without_remat(models) == models else functools.partial(model_flops, models, *args)
    return CompiledSteps(jitted, context, count)
