"""LoRA adapters: which kernels get one, how they start, and the weights the model runs with.

An adapter on a kernel W (Flax layout: Dense [in, out], Conv [kh, kw, in, out]) is

    down  W.shape[:-1] + (r,)   kaiming-uniform, U(+-1/sqrt(fan_in)), fan_in = prod(W.shape[:-1]), as
                                kohya and PEFT initialise theirs (a conv adapter's down is a conv with
                                W's kernel size, so a 3x3 kernel gets a 3x3 down)
    up    (r, out)              zeros: training starts exactly at the base model

and the model runs with  W + scale * alpha / r * einsum("...r,ro->...o", down, up)  (`merged`), built
inside the compiled step from the frozen base and the trained adapters, so no model code changes and
the optimiser, EMA and checkpoints hold only the adapters. The same kernel in PyTorch layout is
kohya's `up @ down` (`convert.lora.save_lora` writes them).

Targets (`LoraSpec.targets`), by the diffusers module names of the UNet and the text encoders:
    attention    to_q, to_k, to_v, to_out.0 (UNet); q/k/v/out_proj (text)
    transformer  kohya's default: every Linear of each transformer block and its proj_in / proj_out;
                 every Linear of each text-encoder layer (attention and MLP)
    conv         transformer + the resnets' conv1, conv2, time_emb_proj, conv_shortcut and the down /
                 upsamplers' convs (LoCon), 3x3 kernels with `conv_rank` / `conv_alpha`

In a training run (`config.lora.rank > 0`) the adapters are a tree that mirrors the params: under each
component, the targeted kernel's `kernel` leaf becomes `{"down", "up"}` (`init_lora`). A UNet with
`scan_layers` has its transformer blocks' kernels stacked `[layers, in, out]`, and their adapters too
(down `[layers, in, r]`, up `[layers, r, out]`); `unstacked` splits them per block for the files.
"""

import dataclasses
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

UNET_TARGETS = {
    "attention": (".to_q", ".to_k", ".to_v", ".to_out.0"),
    "transformer": (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2"),
}
UNET_TARGETS["conv"] = UNET_TARGETS["transformer"] + (
    ".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut", "samplers.0.conv",
)  # fmt: skip
TEXT_TARGETS = {
    "attention": (".q_proj", ".k_proj", ".v_proj", ".out_proj"),
    "transformer": (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"),
}
TEXT_TARGETS["conv"] = TEXT_TARGETS["transformer"]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank / alpha of the adapters (alpha / rank scales them), conv_rank / conv_alpha those of 3x3
    kernels under `conv` targets (0: conv_rank = rank), and which kernels get one."""

    rank: int = 32
    alpha: float = 16.0
    targets: str = "transformer"
    conv_rank: int = 0
    conv_alpha: float = 1.0

    def __post_init__(self):
        if self.targets not in UNET_TARGETS:
            raise ValueError(f"lora targets {self.targets!r} is not one of {sorted(UNET_TARGETS)}")
        if self.rank < 1 or self.conv_rank < 0:
            raise ValueError(f"lora rank must be >= 1 and conv_rank >= 0, got {self.rank}, {self.conv_rank}")
        if not (self.alpha > 0 and self.conv_alpha > 0):  # files read alpha 0 as alpha = rank
            raise ValueError(f"lora alpha and conv_alpha must be > 0, got {self.alpha}, {self.conv_alpha}")

    def rank_alpha(self, kernel_shape) -> tuple[int, float]:
        """(r, alpha) of the adapter on a kernel of this (Flax) shape."""
        spatial = len(kernel_shape) == 4 and kernel_shape[0] * kernel_shape[1] > 1
        if spatial and self.conv_rank:
            return self.conv_rank, self.conv_alpha
        return self.rank, self.alpha

    def targets_module(self, component: str, torch_module: str) -> bool:
        """Whether the module (a diffusers name, e.g. `down_blocks.1.attentions.0.proj_in`) gets an adapter."""
        suffixes = (UNET_TARGETS if component == "unet" else TEXT_TARGETS)[self.targets]
        return torch_module.endswith(suffixes)


def init_adapters(key: jax.Array, kernels: dict, spec: LoraSpec, dtype=jnp.float32, stacked=frozenset()):
    """`{name: {"down", "up"}}` for the named kernels (shapes only are read): down kaiming-uniform, up 0.
    Names in `stacked` are scanned layers' kernels `[layers, ...]`: one adapter per layer. A kernel boxed
    with its logical axes (`nn.Partitioned`, as `abstract_params` gives them) gets boxed adapters: down
    takes the kernel's input axes, up its output axis, so they shard along with it (rank: replicated)."""
    out = {}
    for k, (name, kernel) in zip(jax.random.split(key, max(len(kernels), 1)), sorted(kernels.items())):
        names = kernel.names if isinstance(kernel, nn.Partitioned) else None
        full = nn.meta.unbox(kernel).shape
        lead, shape = (full[:1], full[1:]) if name in stacked else ((), full)
        rank, _ = spec.rank_alpha(shape)
        bound = 1 / math.sqrt(math.prod(shape[:-1]))
        down = jax.random.uniform(k, (*lead, *shape[:-1], rank), dtype, -bound, bound)
        up = jnp.zeros((*lead, rank, shape[-1]), dtype)
        if names is not None:
            down = nn.Partitioned(down, names=(*names[:-1], None))
            up = nn.Partitioned(up, names=(*names[: len(lead)], None, names[-1]))
        out[name] = {"down": down, "up": up}
    return out


def delta(adapter: dict, spec: LoraSpec, scale: float = 1.0) -> jax.Array:
    """scale * alpha / r * down @ up, in the kernel's (Flax) shape, fp32 (stacked adapters: per layer)."""
    if adapter["up"].ndim == 3:  # [layers, r, out]: a scanned layer's
        return jax.vmap(lambda d, u: delta({"down": d, "up": u}, spec, scale))(adapter["down"], adapter["up"])
    rank, alpha = spec.rank_alpha((*adapter["down"].shape[:-1], adapter["up"].shape[-1]))
    down, up = adapter["down"].astype(jnp.float32), adapter["up"].astype(jnp.float32)
    return (scale * alpha / rank) * jnp.einsum("...r,ro->...o", down, up)


def merged(kernels: dict[str, jax.Array], adapters: dict, spec: LoraSpec, scale: float = 1.0) -> dict:
    """The named kernels with their adapters added (in fp32, then back to each kernel's dtype)."""
    return {
        name: (w.astype(jnp.float32) + delta(adapters[name], spec, scale)).astype(w.dtype) if name in adapters else w
        for name, w in kernels.items()
    }


# ---- adapters in a training run ----------------------------------------------------------------------


def spec_from_config(lora: ml_collections.ConfigDict) -> LoraSpec | None:
    """`config.lora` -> its `LoraSpec`; None for rank 0 (no LoRA: the trainable components train whole)."""
    if lora.rank == 0:
        return None
    return LoraSpec(lora.rank, lora.alpha, lora.targets, lora.conv_rank, lora.conv_alpha)


def text_encoders(lora: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The text encoders `config.lora.text_encoders` names (comma-separated; "" none)."""
    names = tuple(n.strip() for n in lora.text_encoders.split(",") if n.strip())
    if unknown := set(names) - {"text_encoder", "text_encoder_2"}:
        raise ValueError(f"lora.text_encoders: {sorted(unknown)} are not text_encoder / text_encoder_2")
    return names


def _is_adapter(_, x) -> bool:
    return isinstance(x, dict) and set(x) == {"down", "up"}


def flat_adapters(adapters: dict) -> dict[str, dict]:
    """The adapter tree -> `{"component/flax/path/kernel": {"down", "up"}}` (`convert.lora.adapter_name`)."""
    flat = flax.traverse_util.flatten_dict(adapters, is_leaf=_is_adapter)
    return {"/".join(path): adapter for path, adapter in flat.items()}


def configs_only(models):
    """`models` as a `PipelineWeights` without params: what LoRA module tables and writers read."""
    from sdxl_jax.convert.pipeline_weights import PipelineWeights

    return PipelineWeights(models.kind, {n: (models.config(n), None) for n in models.components})


def target_kernels(models, spec: LoraSpec, components: tuple[str, ...], params: dict) -> tuple[dict, frozenset]:
    """(`{"component/flax/path/kernel": kernel}` of the kernels in `params` (the models' own tree, boxed
    or not: a scanned UNet's stacked) that `spec` puts an adapter on, the names of the stacked ones)."""
    from sdxl_jax.convert.lora import modules

    weights = configs_only(models)
    scanned = models.unet.scan_layers
    flat = {c: flax.traverse_util.flatten_dict(params[c]) for c in components}  # boxed or not
    kernels, stacked = {}, set()
    for m in modules(weights):
        if m.component not in components or not spec.targets_module(m.component, m.torch_key.removesuffix(".weight")):
            continue
        path = m.path
        if m.component == "unet" and scanned:
            path = tuple(re.sub(r"^transformer_blocks_\d+$", "transformer_blocks", p) for p in m.path)
        name = "/".join((m.component, *path))
        kernels[name] = flat[m.component][path]
        if path != m.path:
            stacked.add(name)
    return kernels, frozenset(stacked)


def init_lora(models, spec: LoraSpec, components: tuple[str, ...], params: dict, key: jax.Array) -> dict:
    """The adapter tree of a run (fp32, up 0: the run starts at `params`' model); params: the components'
    params (arrays or abstract, boxed or not: only shapes and logical axes are read)."""
    kernels, stacked = target_kernels(models, spec, components, params)
    flat = init_adapters(key, kernels, spec, stacked=stacked)
    return flax.traverse_util.unflatten_dict({tuple(name.split("/")): a for name, a in flat.items()})


def with_adapters(
    params: dict, adapters: dict, spec: LoraSpec, dropout: float = 0.0, key=None, dtypes=None, shardings=None
) -> dict:
    """`params` (`{component: params}`) with every adapter merged into its kernel: what the models run with.

    dropout > 0 (training; needs `key`): rank dropout, each adapter's rank components kept with
    probability 1 - dropout and scaled by 1 / (1 - dropout), one draw per adapter per step (kohya's
    `rank_dropout` draws per example; a merged kernel is shared by the batch).

    Inside the train step: dtypes (`{component: dtype}`) casts each merged kernel to the component's
    compute dtype right away (the model casts it there anyway, so nothing changes numerically, but the
    merged copies and their gradients take half the memory in bf16); shardings (`{component: tree of
    NamedSharding}`, the frozen params') lays each merged kernel out like its base kernel — without it
    XLA may keep the merged kernels whole on every device."""
    out = dict(params)
    for i, (component, tree) in enumerate(sorted(adapters.items())):
        flat = flax.traverse_util.flatten_dict(params[component])
        dtype = None if dtypes is None else dtypes[component]
        layout = None if shardings is None else flax.traverse_util.flatten_dict(shardings[component])
        for j, (path, adapter) in enumerate(sorted(flax.traverse_util.flatten_dict(tree, is_leaf=_is_adapter).items())):
            if dropout:
                k = jax.random.fold_in(jax.random.fold_in(key, i), j)
                keep = jax.random.bernoulli(k, 1.0 - dropout, adapter["up"].shape[:-1])
                adapter = {"down": adapter["down"], "up": adapter["up"] * keep[..., None] / (1.0 - dropout)}
            w = flat[path]
            w_new = (w.astype(jnp.float32) + delta(adapter, spec)).astype(dtype or w.dtype)
            flat[path] = w_new if layout is None else jax.lax.with_sharding_constraint(w_new, layout[path])
        out[component] = flax.traverse_util.unflatten_dict(flat)
    return out


def unstacked(adapters: dict) -> dict:
    """The adapter tree with a scanned UNet's stacked adapters split per block (`transformer_blocks_<i>`),
    named as the files name modules."""
    from sdxl_jax.convert.unet import unstack_scanned_blocks

    return {c: unstack_scanned_blocks(tree) if c == "unet" else tree for c, tree in adapters.items()}
