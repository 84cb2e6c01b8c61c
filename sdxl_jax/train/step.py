"""The training step as a pure function, (state, frozen params, global batch) -> (state, metrics), and
what compiling it needs: one frozen `StepSpec`.

    spec = StepSpec.build(config, mesh)          # models, optimiser, LR schedule, config, shardings, objective
    step = CompiledSteps(spec, lambda: tracing_context(config, mesh))
    state, metrics = step(state, frozen, batch)

`config.objective` picks the step from `OBJECTIVES`:

- "diffusion" (`diffusion_step`): the diffusion loss (`objective.py`) -> gradients -> global-norm
  clip, the UNet's optimiser (AdamW or Muon; `optim.py`), `MultiSteps` accumulation -> EMA -> the next
  state. With LoRA the state's params are the adapters: the loss merges them into the frozen kernels
  inside the step (`state.model_params`), so gradients, optimiser state and EMA exist for the adapters
  alone.
- "autoencoder" (`autoencoder.autoencoder_step`): the VAE's update then the discriminator's, on the
  same batch, as ldm trains its first stage; its static part (`StepSpec.objective`, an
  `AutoencoderObjective`) holds the loss weights and the discriminator's optimiser, and tells the state
  what else to hold (`state.AdversarialState`).
- "add" (`distillation.distillation_step`): adversarial diffusion distillation; the student's update
  then the discriminator heads', its static part a `DistillationObjective` (the frozen teacher, the
  heads and their optimiser).

Every objective ends in `optim.advance`: a non-finite loss or gradient leaves the state as it was (only
`step` and the skip counters move).

Everything random comes from `fold_in(state.rng, state.step)`, so a step's result depends on the
state and the batch alone: resuming from a checkpoint replays the same steps bit for bit, and with
JAX's partitionable threefry the numbers do not depend on how the batch is sharded.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sdxl_jax.models import UNet
from sdxl_jax.sharding import batch_sharding
from sdxl_jax.train.autoencoder import AutoencoderObjective, autoencoder_step
from sdxl_jax.train.distillation import DistillationObjective, distillation_step
from sdxl_jax.train.flops import jaxpr_flops
from sdxl_jax.train.lora import LoraSpec, spec_from_config
from sdxl_jax.train.objective import diffusion_loss, encode_batch
from sdxl_jax.train.optim import advance, make_optimizer, optimiser_step
from sdxl_jax.train.state import (
    Models,
    TrainState,
    model_params,
    models_from_config,
    state_shardings,
    trainable_components,
    xla_attention,
)


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything the compiled step closes over, built once per run (and by the planner, abstractly).

    state_shardings: a `TrainState` of `NamedSharding`s; frozen_shardings: `{name: shardings}` of
    the frozen params; batch_sharding: one `NamedSharding` (batch axis split) for every batch entry;
    lora: the adapters' spec when the run trains LoRA adapters (None: whole components); objective:
    the objective's static part (`OBJECTIVES`; None for diffusion, whose settings are `config.diffusion`).
    """

    models: Models
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    config: ml_collections.ConfigDict
    state_shardings: Any
    frozen_shardings: dict
    batch_sharding: NamedSharding
    lora: LoraSpec | None
    objective: Any = None

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> "StepSpec":
        """The spec of `config`'s run on `mesh`: models from `config.model`, the optimiser over the
        trainable components, the objective's own part, every sharding from `eval_shape` alone (nothing
        is allocated)."""
        if config.objective not in OBJECTIVES:
            raise ValueError(f"objective {config.objective!r} not in {sorted(OBJECTIVES)}")
        models = models_from_config(config.model)
        trainable = trainable_components(config, models)
        tx, lr = make_optimizer(config.optimizer, trainable)
        objective = OBJECTIVES[config.objective].static(config)
        st_sh, frozen_sh = state_shardings(config, models, tx, mesh, config.sharding_rules, objective)
        batches = batch_sharding(mesh, config.sharding_rules)
        return cls(models, tx, lr, config, st_sh, frozen_sh, batches, spec_from_config(config.lora), objective)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.batch_sharding.mesh

    @property
    def param_shardings(self) -> dict:
        """`{component: shardings}` of every component's params (each whole), trainable and frozen."""
        if self.lora is not None:
            return {name: self.frozen_shardings[name] for name in self.models.components}  # the state holds adapters
        merged = model_params(self.frozen_shardings, self.state_shardings.params, None)
        return {name: merged[name] for name in self.models.components}

    def without_remat(self) -> "StepSpec":
        """The same step keeping every activation, with XLA attention: the program whose FLOPs are the
        model FLOPs (MFU does not count the forward passes that remat repeats, and a Pallas kernel's
        matmuls are invisible to `jaxpr_flops`)."""
        models = self.models
        if models.unet is not None:
            models = dataclasses.replace(models, unet=models.unet.replace(remat="none"))
        return dataclasses.replace(self, models=xla_attention(models))


def diffusion_step(state: TrainState, frozen: dict, batch: dict, key: jax.Array, spec: StepSpec):
    """One batch of the diffusion objective (with LoRA, through the adapters). Returns the next state
    and scalar metrics (loss, grad_norm, lr, finite, updates, skipped, ...)."""
    models, tx, config = spec.models, spec.tx, spec.config
    k_vae, k_loss = jax.random.split(key)

    def loss_fn(params):
        everything = model_params(
            frozen, params, spec.lora, dropout=config.lora.dropout, key=jax.random.fold_in(key, 2),
            dtypes={n: models.config(n).dtype for n in models.components}, shardings=spec.frozen_shardings,
        )  # fmt: skip
        x0, cond = encode_batch(models, everything, batch, k_vae)
        unet = lambda x_t, t, c: UNet(models.unet).apply({"params": everything["unet"]}, x_t, t, c.context, c.y)
        return diffusion_loss(unet, config.diffusion, x0, cond, k_loss)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state, moved = optimiser_step(tx, state.params, state.opt_state, grads)
    new, common = advance(state, finite, params, opt_state, moved, config.ema)
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "lr": spec.lr_schedule(state.updates), **common,
        "t_mean": aux["t"].astype(jnp.float32).mean(),
    }  # fmt: skip
    return new, metrics


class Objective(NamedTuple):
    """One training objective: its static part from the config (what `StepSpec.objective` holds) and
    its step `(state, frozen, batch, key, spec) -> (state, metrics)`."""

    static: Callable[[ml_collections.ConfigDict], Any]
    step: Callable


# config.objective -> the objective. Diffusion (and LoRA, its variant) reads config.diffusion and needs
# no static part; the autoencoder's is an `AutoencoderObjective`, ADD's a `DistillationObjective`.
OBJECTIVES = {
    "diffusion": Objective(lambda config: None, diffusion_step),
    "autoencoder": Objective(AutoencoderObjective.from_config, autoencoder_step),
    "add": Objective(DistillationObjective.from_config, distillation_step),
}


def train_step(state: TrainState, frozen: dict, batch: dict, *, spec: StepSpec) -> tuple[TrainState, dict]:
    """One batch of the run's objective; everything random in it comes from `fold_in(state.rng, state.step)`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return OBJECTIVES[spec.config.objective].step(state, frozen, batch, key, spec)


def make_train_step(spec: StepSpec):
    """`jax.jit` of `train_step` with the state donated, in/out shardings fixed, metrics replicated."""
    replicated = NamedSharding(spec.mesh, PartitionSpec())
    return jax.jit(
        functools.partial(train_step, spec=spec),
        in_shardings=(spec.state_shardings, spec.frozen_shardings, spec.batch_sharding),
        out_shardings=(spec.state_shardings, replicated),
        donate_argnums=0,
    )


def model_flops(spec: StepSpec, state, frozen, batch) -> float:
    """Model FLOPs of one whole step (all devices) for these (possibly abstract) inputs: the matmuls and
    convolutions of the step traced without remat (`flops.jaxpr_flops`); nothing is compiled."""
    return jaxpr_flops(make_train_step(spec.without_remat()).trace(state, frozen, batch).jaxpr)


class CompiledSteps:
    """The jitted step compiled ahead of time once per batch signature (bucket), with its model FLOPs:
    `steps(state, frozen, batch)`, then `last_flops` (the whole step, all devices) and `last_compiled`
    (whether that call compiled, i.e. its time is not a step time). Traced inside `context()`
    (`sharding.tracing_context`: whether the models' activation constraints take effect).

    Without remat the step's own trace is counted; with it, `model_flops` traces the step once more
    without remat.
    """

    def __init__(self, spec: StepSpec, context):
        self.spec, self.context = spec, context
        self.jitted = make_train_step(spec)
        self.has_remat = spec.models.unet is not None and spec.models.unet.remat != "none"
        self.compiled, self.flops = {}, {}
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
                self.flops[key] = (
                    model_flops(self.spec, state, frozen, batch) if self.has_remat else jaxpr_flops(traced.jaxpr)
                )
        self.last_flops = self.flops[key]
        return self.compiled[key](state, frozen, batch)
