"""The device mesh of a run: processes joined, axes (`data`, `fsdp`, `tensor`) sized from the config.

    initialize_distributed(config.distributed)   # before anything touches a device
    mesh = make_mesh(config.mesh)                # Mesh(('data', 'fsdp', 'tensor')), AxisType.Auto
    sharding = batch_sharding(mesh, config.sharding_rules)   # how a batch's leading axis is split
    with tracing_context(config, mesh):                      # around tracing the step / the sampler
        ...

The models annotate activations with `nn.with_logical_constraint` (block boundaries, and the input
and output of every dense layer: `models.layers.Dense`); those are no-ops unless the logical rules
and a mesh are in context while the step is traced. With `config.activation_constraints` the train
step and the validation sampler are traced inside `sharding_context` (not the state's init: unboxing
abstract params there would try to constrain them outside `jit`). It cuts the planned memory of the
full 1024² step by half. The dense layers' constraints are what keep it correct with `tensor` > 1:
constraining only the block boundaries left XLA's SPMD partitioner to lay out the tensor-parallel
matmuls itself, and it miscompiled some (wrong loss and gradients on (2, 2, 2); see `Dense`).
"""

import contextlib
import math

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sdxl_jax.parallel import MESH_AXES


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
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


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
    """The sharding of every batch entry: its leading axis split as the rules map `batch`."""
    return NamedSharding(mesh, PartitionSpec(*nn.logical_to_mesh_axes(("batch",), rules)))


def batch_shards(mesh: jax.sharding.Mesh, rules) -> int:
    """How many ways the batch axis is split (the global batch must be a multiple)."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a is not None)
