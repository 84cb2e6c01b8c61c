"""What a training run carries from step to step: the networks (`Models`), their params and the `TrainState`.

    models = models_from_config(config.model)        # the four component configs, checked together
    spec = StepSpec.build(config, mesh)               # (step.py) the optimiser and every sharding
    state, frozen = create_sharded_state(spec)        # born sharded, nothing on the host

The state holds the *trainable* params (the UNet; with `train_text_encoders` the text encoders too),
their optimiser state and EMA, the step and the RNG; `frozen` holds the rest (VAE, frozen text
encoders), which are never checkpointed: they come again from `init_from` (or the seed). With LoRA
(`config.lora.rank > 0`, `train/lora.py`) the state's params are the adapters alone, `frozen` holds
every component, and `model_params` merges the two into what the models run with.

The autoencoder objective (`config.objective = "autoencoder"`, `train/autoencoder.py`) trains a VAE
alone (`Models.kind == "autoencoder"`: no UNet, no text encoders): the state's params are `{"vae"}`
(with `autoencoder.decoder_only` its decoder side only, the encoder side frozen; with a learned
log-variance also `"logvar"`), and the state is an `AdversarialState`, which adds the discriminator's
params, running statistics and optimiser state; `frozen` adds the loss's fixed networks (LPIPS). An
objective with a discriminator supplies those through four methods of its `StepSpec.objective`
(`abstract_frozen`, `frozen_params`, `abstract_discriminator`, `discriminator_variables`). ADD
(`config.objective = "add"`, `train/distillation.py`) trains the UNet like a fine-tune, in an
`AdversarialState` with its discriminator heads; its `frozen` adds `"teacher"`, a copy of the initial
UNet params, never trained.
Master weights are the params' dtype (`param_dtype`, fp32 for training); the models compute in
their `dtype` (bf16 in the full-size configs), so the UNet casts the fp32 master weights on use.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdxl_jax.conditioning import TextEncoders
from sdxl_jax.convert.pipeline_weights import Placement, config_from_dict, load_pipeline_weights, load_vae_for
from sdxl_jax.convert.unet import stack_scanned_blocks, unstack_scanned_blocks
from sdxl_jax.models import CLIPTextConfig, CLIPTextModel, UNet, UNetConfig, VAEConfig
from sdxl_jax.models.pixel_space import FirstStageConfig, first_stage
from sdxl_jax.sharding import param_shardings
from sdxl_jax.train import lora

BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5  # (orig h, w, crop top, left, target h, w) / (..., aesthetic score)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
MODEL_KINDS = ("base", "refiner", "autoencoder")
# What decoder-only fine-tuning trains: everything after the latent (ldm's last layer, decoder.conv_out, too).
DECODER_SIDE = ("decoder", "post_quant_conv")


@dataclasses.dataclass(frozen=True)
class Models:
    """The configs of an SDXL pipeline's networks. base: CLIP-L + bigG; refiner: bigG only; autoencoder:
    the VAE alone (what the autoencoder objective trains)."""

    kind: str  # "base" | "refiner" | "autoencoder"
    unet: UNetConfig | None  # None for the autoencoder
    vae: FirstStageConfig  # an AutoencoderKL's, or pixel space (the demo)
    text_encoder: CLIPTextConfig | None  # CLIP-L
    text_encoder_2: CLIPTextConfig | None  # bigG, with its projection (the pooled vector); None for the autoencoder

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.kind == "autoencoder":
            if any(self.config(n) is not None for n in ("unet", *TEXT_ENCODERS)):
                raise ValueError("an autoencoder has a VAE only: unet, text_encoder and text_encoder_2 must be None")
            if not isinstance(self.vae, VAEConfig):
                raise ValueError("an autoencoder is a VAE (AutoencoderKL); pixel space has nothing to train")
            return
        if self.unet is None or self.text_encoder_2 is None:
            raise ValueError(f"an SDXL {self.kind} has a unet and a text_encoder_2")
        if (self.text_encoder is None) != (self.kind == "refiner"):
            raise ValueError("the base has a CLIP-L text_encoder, the refiner has none")
        g, unet = self.text_encoder_2, self.unet
        context = g.hidden_size + (0 if self.text_encoder is None else self.text_encoder.hidden_size)
        if unet.context_dim != context:
            raise ValueError(f"unet.context_dim {unet.context_dim} != the text encoders' widths ({context})")
        adm = g.projection_dim + self.num_time_ids * unet.time_id_embed_dim
        if unet.adm_in_channels != adm:
            raise ValueError(
                f"unet.adm_in_channels {unet.adm_in_channels} != pooled {g.projection_dim} + "
                f"{self.num_time_ids} x {unet.time_id_embed_dim} = {adm}"
            )
        if unet.in_channels != self.vae.latent_channels:
            raise ValueError(f"unet.in_channels {unet.in_channels} != vae.latent_channels {self.vae.latent_channels}")

    @property
    def num_time_ids(self) -> int:
        return REFINER_TIME_IDS if self.kind == "refiner" else BASE_TIME_IDS

    @property
    def components(self) -> tuple[str, ...]:
        if self.kind == "autoencoder":
            return ("vae",)
        return ("unet", "vae") + tuple(n for n in TEXT_ENCODERS if getattr(self, n) is not None)

    def config(self, name: str):
        return getattr(self, name)

    def encoders(self, params: dict) -> TextEncoders:
        """The text encoders as the conditioning code takes them, from `{name: params}`."""
        if self.kind == "refiner":
            return TextEncoders(self.text_encoder_2, params["text_encoder_2"])
        return TextEncoders(self.text_encoder_2, params["text_encoder_2"], self.text_encoder, params["text_encoder"])


def xla_attention(models: Models) -> Models:
    """`models` with every component on the XLA attention path: the reference program whose matmuls
    `flops.jaxpr_flops` can see (a Pallas kernel's are hidden in its custom call)."""
    configs = {n: models.config(n) for n in models.components}
    changes = {n: c.replace(attention="xla") for n, c in configs.items() if getattr(c, "attention", "xla") != "xla"}
    return dataclasses.replace(models, **changes) if changes else models


def models_from_config(cfg: ml_collections.ConfigDict) -> Models:
    """`config.model` -> `Models`; unknown or missing fields are errors."""
    build = lambda name: None if cfg[name] is None else config_from_dict(name, cfg[name].to_dict())
    return Models(cfg.kind, build("unet"), build("vae"), build("text_encoder"), build("text_encoder_2"))


def trainable_components(config: ml_collections.ConfigDict, models: Models) -> tuple[str, ...]:
    """The components a run trains (whole, or with LoRA through adapters): the UNet, and text encoders
    per `train_text_encoders` (whole) or `lora.text_encoders` (adapters); the autoencoder objective's VAE."""
    if config.objective == "autoencoder":
        return ("vae",)
    if config.lora.rank:
        names = lora.text_encoders(config.lora)
        if missing := [n for n in names if models.config(n) is None]:
            raise ValueError(f"lora.text_encoders: this {models.kind} has no {', '.join(missing)}")
        return ("unet",) + names
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


@functools.lru_cache(maxsize=4)
def abstract_params(models: Models) -> dict:
    """`{component: boxed ShapeDtypeStructs}` from `eval_shape` (shapes and logical axes, no arrays), traced
    once per `Models`: the spec's shardings and the planner's inputs both read it."""
    return jax.eval_shape(lambda: init_params(models, jax.random.key(0)))


def load_params(models: Models, path: str, shardings: dict | None = None) -> dict:
    """`{component: params}` from a PipelineWeights path, cast to each config's `param_dtype` (the
    autoencoder's `{"vae"}` from a VAE: `convert.pipeline_weights.load_vae_for`'s diffusers AutoencoderKL
    folder, a pipeline folder's vae/, or an ldm-layout file).

    The file's architecture must be the config's (runtime fields like dtype or remat aside); the
    UNet's transformer blocks are stacked or unstacked to the config's `scan_layers`. shardings
    (`{component: tree of Shardings}`): each tensor is placed as it is read (a `Placement`; the host
    never holds the whole model) where the file's tree is the config's; other components (a UNet to
    restack) and every component without `shardings` come back as numpy."""

    def check(name, cfg):
        want, have = models.config(name).architecture(), cfg.architecture()
        if want != have:
            raise ValueError(
                f"{path}: {name} architecture differs from the config's:\n  file:   {have}\n  config: {want}"
            )

    def placed_like_the_config(name, cfg):  # a Placement's shardings: the file's config comes first
        check(name, cfg)
        same_tree = name != "unet" or cfg.scan_layers == models.unet.scan_layers
        return shardings[name] if same_tree else None  # None: read into numpy, restacked below

    placement = None
    if shardings is not None:
        dtypes = {name: models.config(name).param_dtype for name in models.components}
        placement = Placement(placed_like_the_config, dtypes)
    if models.kind == "autoencoder":  # a VAE file or folder, not a pipeline
        cfg, params = load_vae_for(path, models.vae, placement)
        check("vae", cfg)
        if not any(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
            dtype = np.dtype(jnp.dtype(models.vae.param_dtype))
            params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
        return {"vae": params}
    weights = load_pipeline_weights(path, placement=placement)
    if weights.model != models.kind:
        raise ValueError(f"{path} holds an SDXL {weights.model}, the config trains a {models.kind}")
    out = {}
    for name in models.components:
        check(name, weights.config(name))
        if any(isinstance(x, jax.Array) for x in jax.tree.leaves(weights.params(name))):
            out[name] = weights.params(name)  # placed as it was read
            continue
        dtype = np.dtype(jnp.dtype(models.config(name).param_dtype))
        params = weights.params(name)
        if name == "unet" and models.unet.scan_layers != weights.config(name).scan_layers:
            params = stack_scanned_blocks(params) if models.unet.scan_layers else unstack_scanned_blocks(params)
        out[name] = jax.tree.map(lambda x, dtype=dtype: np.asarray(x).astype(dtype), params)
    return out


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


@flax.struct.dataclass
class DiscriminatorState:
    """A discriminator trained beside the model: its params, its other variable collections (taming's
    PatchGAN: BatchNorm's running averages, `{"batch_stats": ...}`), its own optimiser's state."""

    params: dict
    collections: dict  # {collection: variables}, moved by the step, not by the optimiser
    opt_state: Any


@flax.struct.dataclass
class AdversarialState(TrainState):
    """A `TrainState` with a discriminator (the autoencoder and ADD objectives). A subclass, so the checkpoints
    of runs without one keep their tree."""

    discriminator: DiscriminatorState


def new_state(params: dict, tx: optax.GradientTransformation, seed: int, discriminator=None) -> TrainState:
    """The state at step 0 around `params` (boxed or not: boxes pass through, for sharding specs); an
    `AdversarialState` when a `DiscriminatorState` is given."""
    zero = jnp.zeros((), jnp.int32)
    ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    rng = jax.random.key_data(jax.random.key(seed))
    if discriminator is None:
        return TrainState(zero, zero, params, tx.init(params), ema, rng, zero, zero)
    return AdversarialState(zero, zero, params, tx.init(params), ema, rng, zero, zero, discriminator)


def discriminator_state(variables: dict, tx: optax.GradientTransformation) -> DiscriminatorState:
    """A discriminator's `DiscriminatorState` at step 0 from its variables (`{"params", ...}`)."""
    params = variables["params"]
    collections = {name: tree for name, tree in variables.items() if name != "params"}
    return DiscriminatorState(params, collections, tx.init(params))


def split_params(params: dict, trainable: tuple[str, ...]) -> tuple[dict, dict]:
    return {k: v for k, v in params.items() if k in trainable}, {k: v for k, v in params.items() if k not in trainable}


def merge_components(frozen: dict, trained: dict) -> dict:
    """`{component: params}` of both, a component split between them (decoder-only fine-tuning's VAE)
    joined again at its top-level modules."""
    out = dict(frozen)
    for name, tree in trained.items():
        out[name] = {**frozen[name], **tree} if name in frozen else tree
    return out


def split_trained(config, models: Models, params: dict) -> tuple[dict, dict]:
    """(the state's params, frozen params) from every component's `params` without LoRA: the trainable
    components whole; for the autoencoder with `decoder_only`, the VAE's `DECODER_SIDE` trained and the
    rest of it frozen, and with a learned log-variance a fp32 `"logvar"` scalar (at `logvar_init`)."""
    trained, frozen = split_params(params, trainable_components(config, models))
    if config.objective != "autoencoder":
        return trained, frozen
    ae = config.autoencoder
    if ae.decoder_only:
        vae = trained.pop("vae")
        trained["vae"] = {k: v for k, v in vae.items() if k in DECODER_SIDE}
        frozen["vae"] = {k: v for k, v in vae.items() if k not in DECODER_SIDE}
    if ae.loss.learn_logvar:
        trained["logvar"] = jnp.full((), ae.loss.logvar_init, jnp.float32)
    return trained, frozen


def lora_key(seed: int) -> jax.Array:
    """The adapters' init key, apart from the components' (`init_params` folds in 0..3)."""
    return jax.random.fold_in(jax.random.key(seed), 100)


def trained_and_frozen(config, models: Models, params: dict, key: jax.Array) -> tuple[dict, dict]:
    """(the state's params, frozen params) from every component's `params` (arrays or abstract): the
    trainable components and the rest (`split_trained`), or with LoRA new adapters (from `key`) and
    every component."""
    spec = lora.spec_from_config(config.lora)
    if spec is None:
        return split_trained(config, models, params)
    return lora.init_lora(models, spec, trainable_components(config, models), params, key), params


def model_params(frozen: dict, trained: dict, spec: "lora.LoraSpec | None", **merge) -> dict:
    """`{component: params}` the models run with: the frozen and trained components together
    (`merge_components`), or with LoRA (`spec`) the frozen ones with the adapters merged in
    (`lora.with_adapters`, which takes `merge`: dropout, key, dtypes, shardings)."""
    if spec is None:
        return merge_components(frozen, trained)
    return lora.with_adapters(frozen, trained, spec, **merge)


def abstract_trained_and_frozen(config, models: Models) -> tuple[dict, dict]:
    """`trained_and_frozen` from `eval_shape` alone: boxed `ShapeDtypeStruct`s (adapters too)."""
    params = abstract_params(models)
    if lora.spec_from_config(config.lora) is None:
        return split_trained(config, models, params)
    adapters = jax.eval_shape(lambda: trained_and_frozen(config, models, params, lora_key(config.seed))[0])
    return adapters, params


def abstract_state(config, models: Models, tx, objective=None) -> tuple[TrainState, dict]:
    """(the `TrainState`, the frozen params) of a run as boxed `ShapeDtypeStruct`s, from `eval_shape`
    alone; with an `objective` (a `StepSpec.objective`) its discriminator and fixed networks too."""
    train, frozen = abstract_trained_and_frozen(config, models)
    discriminator = None
    if objective is not None:
        frozen = frozen | objective.abstract_frozen(abstract_params(models))
        discriminator = objective.abstract_discriminator()

    def make(params, variables):
        critic = None if variables is None else discriminator_state(variables, objective.tx)
        return new_state(params, tx, config.seed, critic)

    return jax.eval_shape(make, train, discriminator), frozen


def state_shardings(config, models: Models, tx, mesh, rules, objective=None):
    """(`TrainState` shardings, frozen-params shardings), from `eval_shape` alone."""
    state, frozen = abstract_state(config, models, tx, objective)
    return param_shardings(state, mesh, rules), param_shardings(frozen, mesh, rules)


def place(tree, shardings):
    """Host (numpy) arrays -> global arrays with `shardings`; every process passes the whole tree and
    each device takes its own slice (works across hosts). A single array with a single sharding too."""
    put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)


def create_sharded_state(spec) -> tuple[TrainState, dict]:
    """(state, frozen params) of `spec` (a `step.StepSpec`), every array created directly with its sharding.

    Random init: `jax.jit(init, out_shardings=...)`, so no device ever holds a whole model it does not
    own a copy of; `init_from`: the loaded numpy params are sliced onto the devices, then the optimiser
    state is built on device. An objective with a discriminator adds it (and its fixed networks to
    `frozen`) the same way.
    """
    config, models = spec.config, spec.models
    if config.init_from:
        params = load_params(models, config.init_from, spec.param_shardings)
        params = jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) else place(x, s), params, spec.param_shardings)
    else:
        init = lambda key: nn.meta.unbox(init_params(models, key))
        params = jax.jit(init, out_shardings=spec.param_shardings)(jax.random.key(config.seed))
    if spec.lora is None:
        train, frozen = split_trained(config, models, params)
    else:  # the adapters, created on their devices (sharded like their kernels); shapes and axes only are read
        init = lambda key: nn.meta.unbox(trained_and_frozen(config, models, abstract_params(models), key)[0])
        train, frozen = jax.jit(init, out_shardings=spec.state_shardings.params)(lora_key(config.seed)), params
    objective, variables = spec.objective, None
    if objective is not None:
        frozen = frozen | objective.frozen_params(config.seed, spec.frozen_shardings, params)
        d = spec.state_shardings.discriminator
        variables = objective.discriminator_variables(config.seed, {"params": d.params, **d.collections})

    def make(params, variables):
        critic = None if variables is None else discriminator_state(variables, objective.tx)
        return new_state(params, spec.tx, config.seed, critic)

    return jax.jit(make, out_shardings=spec.state_shardings, donate_argnums=(0, 1))(train, variables), frozen
