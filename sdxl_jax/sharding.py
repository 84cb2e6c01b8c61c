"""Everything about where arrays live: the mesh, joining processes, logical axis names and their rules,
and the shardings of parameters, optimiser state and batches.

    initialize_distributed(config.distributed)   # before anything touches a device
    mesh = make_mesh(config.mesh)                # Mesh(('data', 'fsdp', 'tensor')), AxisType.Auto
    shardings = param_shardings(abstract_boxed_params, mesh, config.sharding_rules)
    batch = batch_sharding(mesh, config.sharding_rules)      # how a batch's leading axis is split
    with tracing_context(config, mesh):                      # around tracing the step / the sampler
        ...

Model code never names a mesh axis. Every parameter is annotated (`nn.with_logical_partitioning`) with
names from `LOGICAL_AXES`; activations are constrained (`nn.with_logical_constraint`) with names from
`ACTIVATION_AXES`, a separate vocabulary, so an activation's layout never depends on which rule flax
happened to try first (flax skips a mesh axis an earlier dimension already took). A config's rule list
(`FSDP_RULES` here) maps every name of both vocabularies to mesh axes (`data`, `fsdp`, `tensor`) or None.

The activation constraints are no-ops unless the rules and a mesh are in context while a program is
traced: `tracing_context` provides them when `config.activation_constraints` is set (the train step and
the validation sampler; not the state's init, where unboxing abstract params would try to constrain
them outside `jit`). They cut the planned memory of the full-size step (README, "Hardware notes"), and
with `tensor` > 1 they are what keeps the tensor-parallel matmuls correct (see `models.layers.Dense`).
"""

import contextlib
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter dimensions: name -> what the axis is.
LOGICAL_AXES = {
    "embed": "feature width of a transformer or the input side of a channel Dense",
    "heads": "attention heads x head width (q/k/v output, attention output input)",
    "context": "width of the cross-attention context (text tokens)",
    "mlp": "hidden width of a feed-forward layer",
    "length": "rows of a position-embedding table",
    "conv_height": "vertical taps of a convolution kernel",
    "conv_width": "horizontal taps of a convolution kernel",
    "conv_in": "input channels of a convolution",
    "conv_out": "output channels of a convolution (and per-channel biases)",
    "norm": "per-channel scale and bias of a normalisation",
    "time_in": "sinusoidal timestep features",
    "vector": "the assembled vector conditioning y (pooled text + micro-conditioning)",
    "time_embed": "width of the timestep / vector embedding",
    "layers": "stacked layers of an nn.scan",
    "vocab": "rows of a token embedding table",
}

# Activation dimensions: name -> what the axis is.
ACTIVATION_AXES = {
    "act_batch": "examples in a batch",
    "act_height": "spatial rows",
    "act_width": "spatial columns",
    "act_length": "token or pixel sequence",
    "act_channels": "channels of a convolutional feature map",
    "act_embed": "features of a transformer's residual stream",
    "act_heads": "attention heads x head width (q/k/v, attention output)",
    "act_context": "features of the cross-attention context",
    "act_mlp": "hidden features of a feed-forward layer",
    "act_time": "timestep features and their embedding",
    "act_vector": "the vector conditioning y",
}

# Activation names before they had their own vocabulary, for a clear error on an old rule list.
RENAMED = {"batch": "act_batch", "height": "act_height", "width": "act_width"}

# A Dense's kernel names its input and output features; its activations take these names.
ACTIVATION_OF = {
    "embed": "act_embed",
    "heads": "act_heads",
    "context": "act_context",
    "mlp": "act_mlp",
    "time_in": "act_time",
    "time_embed": "act_time",
    "vector": "act_vector",
    "conv_out": "act_channels",
}

# Fully-sharded data parallel: the big dimension of every weight is split over `fsdp`, the batch over
# both `data` and `fsdp`; heads/mlp go to `tensor` (a no-op while that axis has size 1). Activations
# keep only the batch split, and heads/mlp over `tensor` around the tensor-parallel matmuls.
FSDP_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("context", "fsdp"),
    ("mlp", "tensor"),
    ("length", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),  # before time_embed: a resnet's time_emb_proj [time_embed, conv_out] splits its outputs
    ("norm", None),
    ("time_in", None),
    ("vector", None),
    ("time_embed", "fsdp"),
    ("layers", None),
    ("vocab", None),  # the embedding's wide axis is already split over fsdp
    ("act_batch", ("data", "fsdp")),
    ("act_height", None),
    ("act_width", None),
    ("act_length", None),
    ("act_channels", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_context", None),
    ("act_mlp", "tensor"),
    ("act_time", None),
    ("act_vector", None),
)


def check_rules(rules: Sequence[tuple[str, object]]) -> None:
    """Raises if a rule names an unknown logical axis or an unknown mesh axis."""
    known = LOGICAL_AXES | ACTIVATION_AXES
    for name, target in rules:
        if name in RENAMED:
            raise ValueError(f"rule for {name!r}: activations are named {RENAMED[name]!r} now (sdxl_jax/sharding.py)")
        if name not in known:
            raise ValueError(f"rule for unknown logical axis {name!r}; known: {sorted(known)}")
        targets = target if isinstance(target, tuple) else (target,)
        for t in targets:
            if t is not None and t not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {target!r}: unknown mesh axis {t!r}")


def logical_names_in(tree) -> set[str]:
    """Every logical axis name used by the `nn.LogicallyPartitioned` leaves of `tree`."""
    names = set()
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        if isinstance(leaf, nn.LogicallyPartitioned):
            names.update(n for n in leaf.names if n is not None)
    return names


def param_shardings(abstract_params, mesh: jax.sharding.Mesh, rules):
    """`NamedSharding`s for an (abstract) boxed param tree (or a state holding boxed params).

    A mesh axis is dropped from a dimension it does not divide, so every spec is valid for its
    array; such dimensions are replicated instead. Unknown logical names raise (a name without a
    rule would otherwise be replicated silently). optax's `MaskedNode`s (optimiser state of a
    masked-out param: no array) pass through.
    """
    check_rules(rules)
    missing = logical_names_in(abstract_params) - {name for name, _ in rules}
    if missing:
        raise ValueError(f"logical axes without a sharding rule: {sorted(missing)}")
    specs = nn.get_partition_spec(abstract_params)
    values = nn.meta.unbox(abstract_params)

    def to_sharding(spec, value):
        if isinstance(value, optax.MaskedNode):
            return value
        mesh_spec = nn.logical_to_mesh_axes(spec, rules)
        fitted = []
        for dim, axes in zip(value.shape, mesh_spec):
            axes_t = axes if isinstance(axes, tuple) else (axes,)
            size = int(np.prod([mesh.shape[a] for a in axes_t if a is not None]))
            fitted.append(axes if size > 0 and dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*fitted))

    return jax.tree.map(to_sharding, specs, values, is_leaf=lambda x: isinstance(x, PartitionSpec))


# ---- the mesh ------------------------------------------------------------------------------------


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` when enabled: explicit coordinator/processes if given, else JAX's
    auto-detection (TPU pods, SLURM, ...). A single-process run leaves it disabled."""
    if not cfg.enabled:
        return
    if cfg.coordinator_address:
        jax.distributed.initialize(cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id)
    else:
        jax.distributed.initialize()


def mesh_shape(cfg: ml_collections.ConfigDict, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 resolved; the product must be the device count."""
    sizes = [cfg[axis] for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {device_count} devices")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, there are {device_count}")
    return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The training mesh (`data`, `fsdp`, `tensor`) over `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# Sampling shards only the batch (over `data`); every other activation name has no rule (replicated).
# Tracing the generation program under these rules is what lets a kernel that must be shard_mapped
# (the Pallas `flash` attention) split its batch like the program's inputs.
SAMPLING_RULES = (("act_batch", "data"),)


def data_mesh() -> jax.sharding.Mesh:
    """Every device along `data` (pure data parallel): the sampling pipeline's default."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules):
    """The mesh (`jax.set_mesh`) and the logical-axis rules (`nn.logical_axis_rules`) for tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def tracing_context(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The context to trace models in: `sharding_context` with `activation_constraints`, else none."""
    if config.activation_constraints:
        return sharding_context(mesh, config.sharding_rules)
    return contextlib.nullcontext()


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
    """The sharding of every batch entry: its leading axis split as the rules map `act_batch`."""
    return NamedSharding(mesh, PartitionSpec(*nn.logical_to_mesh_axes(("act_batch",), rules)))


def batch_shards(mesh: jax.sharding.Mesh, rules) -> int:
    """How many ways the batch axis is split (the global batch must be a multiple)."""
    axes = nn.logical_to_mesh_axes(("act_batch",), rules)[0]
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a is not None)


# ---- placing a sampling pipeline's parameters ------------------------------------------------------

PLACEMENTS = ("replicated", "fsdp")


def placement_shardings(abstract_params, mesh: jax.sharding.Mesh, how: str):
    """NamedShardings for a boxed abstract param tree on a sampling mesh: all replicated, or FSDP by
    the training rules restricted to the mesh's axes (a sampling mesh may lack `tensor`)."""
    if how not in PLACEMENTS:
        raise ValueError(f"unknown param_sharding {how!r}; valid: {', '.join(PLACEMENTS)}")
    if how == "replicated":
        replicated = NamedSharding(mesh, PartitionSpec())
        return jax.tree.map(
            lambda _: replicated, abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
    if "fsdp" not in mesh.axis_names:
        raise ValueError(f"param_sharding='fsdp' needs a mesh with an 'fsdp' axis, got {mesh.axis_names}")
    rules = tuple((name, _present(target, mesh.axis_names)) for name, target in FSDP_RULES)
    return param_shardings(abstract_params, mesh, rules)


def _present(target, axis_names):
    axes = tuple(a for a in (target if isinstance(target, tuple) else (target,)) if a in axis_names)
    return axes[0] if len(axes) == 1 else (axes or None)
