"""What every model config shares: `replace`, dtypes, validation of the runtime fields, `architecture()`.

A model's hyper-parameters are one frozen dataclass (`UNetConfig`, `CLIPTextConfig`, `VAEConfig`,
`PixelSpaceConfig`) that inherits `ModelConfig`:

    @dataclasses.dataclass(frozen=True)
    class VAEConfig(ModelConfig):
        ...
        def validate(self):          # the model's own checks; the runtime fields are checked here
            check_norm_groups(self.block_out_channels, self.norm_groups)

Fields split in two kinds. *Architecture* fields decide the parameter tree (widths, depths, norms).
*Runtime* fields (`RUNTIME_FIELDS`: compute and parameter dtype, attention kernel, remat policy,
scanned layers) only decide how the same tensors are computed; `architecture()` resets them, so two
configs describe the same checkpoint layout iff their architectures are equal.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdxl_jax.models.attention import ATTENTION_IMPLS
from sdxl_jax.models.layers import REMAT_POLICIES

# Config fields that change how a model runs, not its tensors (a config has those of them it needs).
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention", "remat", "scan_layers")

# The registry each name-valued runtime field is checked against.
_CHOICES = {"attention": ATTENTION_IMPLS, "remat": REMAT_POLICIES}


def check_choice(field: str, value, choices) -> None:
    """Raise unless `value` is a key of `choices` (a dict of implementations by name)."""
    if value not in choices:
        raise ValueError(f"{field} {value!r} is not one of {sorted(choices)}")


def check_norm_groups(channels, groups: int) -> None:
    """Raise unless every width in `channels` splits into `groups` GroupNorm groups."""
    for ch in channels:
        if ch % groups:
            raise ValueError(f"{ch} channels are not divisible into {groups} norm groups")


def check_positive(field: str, value) -> None:
    if not value > 0:
        raise ValueError(f"{field} must be positive, got {value}")


class ModelConfig:
    """Mixin for a frozen model-config dataclass (it adds no fields). Subclasses put their own checks in
    `validate`; `__post_init__` runs them, then checks the runtime fields the config has."""

    def validate(self) -> None:
        """The model's own consistency checks (raise ValueError); none by default."""

    def __post_init__(self):
        self.validate()
        names = {f.name for f in dataclasses.fields(self)}
        for field, choices in _CHOICES.items():
            if field in names:
                check_choice(field, getattr(self, field), choices)
        self.dtypes  # noqa: B018  (fail early on a bad dtype name)

    def replace(self, **changes):
        """A copy with `changes`, validated again."""
        return dataclasses.replace(self, **changes)

    @property
    def dtypes(self) -> dict:
        """`{"dtype": compute dtype, "param_dtype": ...}` as jnp dtypes: the keyword arguments of every layer."""
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

    def architecture(self):
        """This config with its runtime fields at their defaults: what fixes the parameter tree."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in RUNTIME_FIELDS}
        return self.replace(**defaults)


def abstract_params_of(trace: Callable, cfg, *args):
    """`trace(cfg, *args)` (a model's boxed `ShapeDtypeStruct` parameter tree, from `jax.eval_shape`),
    cached: tracing the full-size UNet takes seconds and loaders ask for the same tree under several
    compute and parameter dtypes and attention kernels. The trace is shared by configs that differ only
    in those (every parameter is created in `param_dtype`); its leaves then get `cfg.param_dtype`.
    Read-only."""
    neutral = cfg.replace(dtype="float32", param_dtype="float32")
    if hasattr(cfg, "attention"):  # the kernel does not change the parameters either
        neutral = neutral.replace(attention="xla")
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), _traced(trace, neutral, args))


@functools.lru_cache(maxsize=16)
def _traced(trace: Callable, cfg, args: tuple):
    return trace(cfg, *args)
