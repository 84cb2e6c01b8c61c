"""What a training run carries from step to step: the models, the optimiser and the `TrainState`.

    models = models_from_config(config.model)        # the four component configs, checked together
    tx, lr = make_optimizer(config.optimizer, trainable_components(config))
    state, frozen = create_sharded_state(config, models, tx, mesh)   # born sharded, nothing on the host

The state holds the *trainable* params (the UNet; with `train_text_encoders` the text encoders too),
their optimiser state and EMA, the step and the RNG; `frozen` holds the rest (VAE, frozen text
encoders), which are never checkpointed: they come again from `init_from` (or the seed).
Master weights are the params' dtype (`param_dtype`, fp32 for training); the models compute in
their `dtype` (bf16 in the full-size configs), so the UNet casts the fp32 master weights on use.
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdxl_jax.conditioning import TextEncoders
from sdxl_jax.convert.export import architecture
from sdxl_jax.convert.pipeline_weights import config_from_dict, load_pipeline_weights
from sdxl_jax.convert.unet import stack_scanned_blocks, unstack_scanned_blocks
from sdxl_jax.models import CLIPTextConfig, CLIPTextModel, UNet, UNetConfig
from sdxl_jax.models.pixel_space import FirstStageConfig, first_stage
from sdxl_jax.parallel import param_shardings

BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5  # (orig h, w, crop top, left, target h, w) / (..., aesthetic score)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class Models:
    """The configs of an SDXL pipeline's networks. base: CLIP-L + bigG; refiner: bigG only."""

    kind: str  # "base" | "refiner"
    unet: UNetConfig
    vae: FirstStageConfig  # an AutoencoderKL's, or pixel space (the demo)
    text_encoder: CLIPTextConfig | None  # CLIP-L
    text_encoder_2: CLIPTextConfig  # bigG, with its projection (the pooled vector)

    def __post_init__(self):
        if self.kind not in ("base", "refiner"):
            raise ValueError(f"model kind must be base or refiner, got {self.kind!r}")
        if (self.text_encoder is None) != (self.kind == "refiner"):
            raise ValueError("the base has a CLIP-L text_encoder, the refiner has none")
        g, unet = self.text_encoder_2, self.unet
        context = g.hidden_size + (0 if self.text_encoder is None else self.text_encoder.hidden_size)
        if unet.context_dim != context:
            raise ValueError(f"unet.context_dim {unet.context_dim} != the text encoders' widths ({context})")
        adm = g.projection_dim + self.num_time_ids * unet.time_id_embed_dim
        if unet.adm_in_channels != adm:
            raise ValueError(f"unet.adm_in_channels {unet.adm_in_channels} != pooled {g.projection_dim} + "
                             f"{self.num_time_ids} x {unet.time_id_embed_dim} = {adm}")
        if unet.in_channels != self.vae.latent_channels:
            raise ValueError(f"unet.in_channels {unet.in_channels} != vae.latent_channels {self.vae.latent_channels}")

    @property
    def num_time_ids(self) -> int:
        return REFINER_TIME_IDS if self.kind == "refiner" else BASE_TIME_IDS

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae") + tuple(n for n in TEXT_ENCODERS if getattr(self, n) is not None)

    def config(self, name: str):
        return getattr(self, name)

    def encoders(self, params: dict) -> TextEncoders:
        """The text encoders as the conditioning code takes them, from `{name: params}`."""
        if self.kind == "refiner":
            return TextEncoders(self.text_encoder_2, params["text_encoder_2"])
        return TextEncoders(self.text_encoder_2, params["text_encoder_2"], self.text_encoder, params["text_encoder"])


def models_from_config(cfg: ml_collections.ConfigDict) -> Models:
    """`config.model` -> `Models`; unknown or missing fields are errors."""
    build = lambda name: None if cfg[name] is None else config_from_dict(name, cfg[name].to_dict())  # noqa: E731
    return Models(cfg.kind, build("unet"), build("vae"), build("text_encoder"), build("text_encoder_2"))


def trainable_components(config: ml_collections.ConfigDict, models: Models) -> tuple[str, ...]:
    if config.train_text_encoders:
        return ("unet",) + tuple(n for n in TEXT_ENCODERS if models.config(n) is not None)
    return ("unet",)


# ---- parameters ----------------------------------------------------------------------------------


def init_component(models: Models, name: str, key: jax.Array):
    """Random boxed (logically annotated) params of one component, from tiny dummy inputs."""
    cfg = models.config(name)
    if name == "unet":
        f = cfg.downsample_factor
        y = None if cfg.adm_in_channels is None else jnp.zeros((1, cfg.adm_in_channels))
        args = (jnp.zeros((1, f, f, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.context_dim)), y)
        return UNet(cfg).init(key, *args)["params"]
    if name == "vae":
        f = cfg.downsample_factor
        return first_stage(cfg).init(key, jnp.zeros((1, f, f, cfg.in_channels))).get("params", {})  # pixels: none
    return CLIPTextModel(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(models: Models, key: jax.Array) -> dict:
    """`{component: boxed params}`, each component from its own fold of `key`."""
    return {name: init_component(models, name, jax.random.fold_in(key, i)) for i, name in enumerate(models.components)}


def load_params(models: Models, path: str) -> dict:
    """`{component: numpy params}` from a PipelineWeights path, cast to each config's `param_dtype`.

    The file's architecture must be the config's (runtime fields like dtype or remat aside); the
    UNet's transformer blocks are stacked or unstacked to the config's `scan_layers`."""
    weights = load_pipeline_weights(path)
    if weights.model != models.kind:
        raise ValueError(f"{path} holds an SDXL {weights.model}, the config trains a {models.kind}")
    out = {}
    for name in models.components:
        want, have = architecture(models.config(name)), architecture(weights.config(name))
        if want != have:
            raise ValueError(f"{path}: {name} architecture differs from the config's:\n  file:   {have}\n  config: {want}")
        dtype = np.dtype(jnp.dtype(models.config(name).param_dtype))
        params = weights.params(name)
        if name == "unet" and models.unet.scan_layers != weights.config(name).scan_layers:
            params = stack_scanned_blocks(params) if models.unet.scan_layers else unstack_scanned_blocks(params)
        out[name] = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    return out


# ---- optimiser -----------------------------------------------------------------------------------


def _constant(opt, peak, after_warmup):
    return optax.constant_schedule(peak)


def _cosine(opt, peak, after_warmup):
    return optax.cosine_decay_schedule(peak, max(opt.decay_steps - opt.warmup_steps, 1), alpha=opt.end_factor)


LR_SCHEDULES = {"constant": _constant, "cosine": _cosine}


def lr_schedule(opt: ml_collections.ConfigDict, peak: float) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps` optimiser updates, then constant or cosine to `end_factor * peak`."""
    main = LR_SCHEDULES[opt.schedule](opt, peak, opt.warmup_steps)
    if opt.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, opt.warmup_steps)
    return optax.join_schedules([warmup, main], [opt.warmup_steps])


def _adamw(opt, schedule):
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)


def muon_dimensions(params):
    """Which axes of each param Muon orthogonalises: every `kernel` as an `[inputs, outputs]` matrix
    (dense `[in, out]`, scanned dense `[layers, in, out]` one matrix per layer, conv `[kh, kw, in, out]`
    as `[kh * kw * in, out]`); None (AdamW) for biases and norm scales."""
    dims = {2: optax.contrib.MuonDimensionNumbers(0, 1), 3: optax.contrib.MuonDimensionNumbers(1, 2),
            4: optax.contrib.MuonDimensionNumbers((0, 1, 2), 3)}

    def one(path, x):  # the last dict key names the param (boxed params add a `.value` after it)
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name != "kernel":
            return None
        if x.ndim not in dims:
            raise ValueError(f"Muon: no matrix layout for a {x.ndim}-D kernel at {jax.tree_util.keystr(path)}")
        return dims[x.ndim]

    return jax.tree_util.tree_map_with_path(one, params)


def _muon(opt, schedule):
    """Muon (optax.contrib): Nesterov momentum, orthogonalised by Newton-Schulz, for the kernels; AdamW
    with Nesterov momentum (NAdamW: optax's Muon uses its flag for both) for the rest. `consistent_rms`
    0.2 scales each update to AdamW's typical RMS, so the same learning rate and weight decay carry over
    (Moonlight's recipe). optax uses one `eps` for both Newton-Schulz's normalisation and AdamW."""
    return optax.contrib.muon(schedule, beta=opt.muon_beta, eps=opt.eps, weight_decay=opt.weight_decay,
                              adam_b1=opt.b1, adam_b2=opt.b2, adam_weight_decay=opt.weight_decay,
                              muon_weight_dimension_numbers=muon_dimensions, consistent_rms=0.2)


OPTIMIZERS = {"adamw": _adamw, "muon": _muon}  # the UNet's; the text encoders always take AdamW


def make_optimizer(opt: ml_collections.ConfigDict, trainable: tuple[str, ...]):
    """(GradientTransformation over `{component: params}`, the UNet's LR schedule).

    Global-norm clipping over all trainable params, then the UNet's `opt.name` (AdamW or Muon) and
    AdamW for the text encoders with their own LR (their largest params are token-embedding tables,
    looked up row by row, not the matrices Muon is made for), wrapped in `optax.MultiSteps` when
    `accumulation_steps > 1` (one update per that many batches; the accumulator costs one more copy
    of the params, so it is only there when asked for).
    """
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {opt.name!r} not in {sorted(OPTIMIZERS)}")
    schedule = lr_schedule(opt, opt.learning_rate)
    unet = OPTIMIZERS[opt.name](opt, schedule)
    if trainable == ("unet",):
        inner = unet
    else:
        text = _adamw(opt, lr_schedule(opt, opt.text_encoder_learning_rate))
        labels = {name: "unet" if name == "unet" else "text" for name in trainable}
        inner = optax.partition({"unet": unet, "text": text}, labels)
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), inner)
    if opt.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulation_steps)
    return tx, schedule


def ema_decay(ema: ml_collections.ConfigDict, updates: jax.Array) -> jax.Array:
    """The EMA decay after `updates` optimiser updates: `min(decay, (1 + n) / (10 + n))` with warmup."""
    if not ema.warmup:
        return jnp.float32(ema.decay)
    n = updates.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema.decay), (1.0 + n) / (10.0 + n))


# ---- the state -----------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: batches consumed
    updates: jax.Array  # int32 []: optimiser updates applied (differs from step with accumulation or skips)
    params: dict  # {component: params}, trainable only
    opt_state: Any
    ema_params: dict  # same tree and shardings as params
    rng: jax.Array  # uint32 [2]: raw threefry key data; step k uses fold_in(key, k)
    skipped: jax.Array  # int32 []: consecutive non-finite steps (reset by a finite one)
    skipped_total: jax.Array  # int32 []


def new_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The state at step 0 around `params` (boxed or not: boxes pass through, for sharding specs)."""
    zero = jnp.zeros((), jnp.int32)
    ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(zero, zero, params, tx.init(params), ema, rng, zero, zero)


def split_params(params: dict, trainable: tuple[str, ...]) -> tuple[dict, dict]:
    return {k: v for k, v in params.items() if k in trainable}, {k: v for k, v in params.items() if k not in trainable}


def state_shardings(models: Models, tx, trainable, seed: int, mesh, rules):
    """(`TrainState` shardings, frozen-params shardings, abstract boxed params), from `eval_shape` alone."""
    boxed = jax.eval_shape(lambda: init_params(models, jax.random.key(seed)))
    train, frozen = split_params(boxed, trainable)
    abstract_state = jax.eval_shape(lambda p: new_state(p, tx, seed), train)
    return param_shardings(abstract_state, mesh, rules), param_shardings(frozen, mesh, rules), boxed


def place(tree, shardings):
    """Host (numpy) arrays -> global arrays with `shardings`; every process passes the whole tree and
    each device takes its own slice (works across hosts)."""
    put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index])  # noqa: E731
    return jax.tree.map(put, tree, shardings)


def create_sharded_state(config: ml_collections.ConfigDict, models: Models, tx, mesh) -> tuple[TrainState, dict, Any]:
    """(state, frozen params, state shardings), every array created directly with its sharding.

    Random init: `jax.jit(init, out_shardings=...)`, so no device ever holds a whole model it does not
    own a copy of; `init_from`: the loaded numpy params are sliced onto the devices, then the optimiser
    state is built on device.
    """
    trainable = trainable_components(config, models)
    rules = config.sharding_rules
    st_shardings, frozen_shardings, boxed = state_shardings(models, tx, trainable, config.seed, mesh, rules)
    param_sh = param_shardings(boxed, mesh, rules)
    if config.init_from:
        params = place(load_params(models, config.init_from), param_sh)
    else:
        init = lambda key: nn.meta.unbox(init_params(models, key))  # noqa: E731
        params = jax.jit(init, out_shardings=param_sh)(jax.random.key(config.seed))
    train, frozen = split_params(params, trainable)
    make = jax.jit(lambda p: new_state(p, tx, config.seed), out_shardings=st_shardings, donate_argnums=0)
    return make(train), frozen, st_shardings
