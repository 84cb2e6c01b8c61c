"""Logical axis names for sharding, and the rules that map them onto a device mesh.

Every parameter in the models is annotated with names from `LOGICAL_AXES` (one closed vocabulary,
checked by the tests); a config then picks a short rule list that maps each name to a mesh axis
(`data`, `fsdp`, `tensor`) or to `None` (replicated). Model code never mentions mesh axes.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

# name -> what the axis is. Activations use the first four; the rest name parameter dimensions.
LOGICAL_AXES = {
    "batch": "examples in a batch (activations)",
    "height": "spatial rows (activations)",
    "width": "spatial columns (activations)",
    "length": "token or pixel sequence (activations; rows of a position-embedding table)",
    "embed": "feature width of a transformer or the input side of a channel Dense",
    "heads": "attention heads x head width (q/k/v output, attention output input)",
    "context": "width of the cross-attention context (text tokens)",
    "mlp": "hidden width of a feed-forward layer",
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

MESH_AXES = ("data", "fsdp", "tensor")

# Fully-sharded data parallel: the big dimension of every weight is split over `fsdp`, the batch over
# both `data` and `fsdp`; heads/mlp go to `tensor` when that axis is larger than 1.
FSDP_RULES = (
    ("batch", ("data", "fsdp")),
    ("height", None),
    ("width", None),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("context", "fsdp"),
    ("mlp", "tensor"),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("time_in", None),
    ("vector", None),
    ("time_embed", "fsdp"),
    ("layers", None),
    ("vocab", None),  # the embedding's wide axis is already split over fsdp
)


def check_rules(rules: Sequence[tuple[str, object]]) -> None:
    """Raises if a rule names an unknown logical axis or an unknown mesh axis."""
    for name, target in rules:
        if name not in LOGICAL_AXES:
            raise ValueError(f"rule for unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}")
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
    """`NamedSharding`s for an (abstract) boxed param tree.

    A mesh axis is dropped from a dimension it does not divide, so every spec is valid for its
    array; such dimensions are replicated instead. Unknown logical names raise (a name without a
    rule would otherwise be replicated silently).
    """
    check_rules(rules)
    missing = logical_names_in(abstract_params) - {name for name, _ in rules}
    if missing:
        raise ValueError(f"logical axes without a sharding rule: {sorted(missing)}")
    specs = nn.get_partition_spec(abstract_params)
    values = nn.meta.unbox(abstract_params)

    def to_sharding(spec, value):
        if isinstance(value, optax.MaskedNode):  # optimiser state of a masked-out param: no array
            return value
        mesh_spec = nn.logical_to_mesh_axes(spec, rules)
        fitted = []
        for dim, axes in zip(value.shape, mesh_spec):
            axes_t = axes if isinstance(axes, tuple) else (axes,)
            size = int(np.prod([mesh.shape[a] for a in axes_t if a is not None]))
            fitted.append(axes if size > 0 and dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*fitted))

    return jax.tree.map(to_sharding, specs, values, is_leaf=lambda x: isinstance(x, PartitionSpec))
