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
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import flax
import flax.linen as nn
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
    if _DISK_CACHE is None:
        return trace(cfg, *args)
    file = _DISK_CACHE / f"{_cache_key(trace, cfg, args)}.json"
    try:
        return _tree_from_json(json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # absent, or unreadable: trace again
        pass
    tree = trace(cfg, *args)
    encoded = _tree_to_json(tree)
    if encoded is not None:
        tmp = None
        try:  # best effort: a full or read-only cache folder costs the next load a trace, nothing else
            with tempfile.NamedTemporaryFile("w", dir=_DISK_CACHE, suffix=".tmp", delete=False) as f:
                tmp = f.name
                f.write(json.dumps(encoded))
            os.replace(tmp, file)  # atomic: concurrent processes never read half a file
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return tree


# Where traced parameter trees are kept across processes (`use_disk_cache`); None: in this process only.
_DISK_CACHE: Path | None = None


def use_disk_cache(folder: str | Path | None) -> None:
    """Keep traced parameter trees as JSON files in `folder` (None: stop): tracing the full-size UNet
    takes seconds of every load, its tree a few milliseconds to read. Entries are keyed by the trace
    function, the config, the arguments, the jax and flax versions and the source of `sdxl_jax.models`,
    so editing a model never reads a stale tree."""
    global _DISK_CACHE
    _DISK_CACHE = None if folder is None else Path(folder)
    if _DISK_CACHE is not None:
        _DISK_CACHE.mkdir(parents=True, exist_ok=True)
    _traced.cache_clear()


@functools.cache
def _models_source_digest() -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _cache_key(trace: Callable, cfg, args: tuple) -> str:
    what = (trace.__module__, trace.__qualname__, repr(cfg), repr(args), jax.__version__, flax.__version__)
    return hashlib.sha256(repr((what, _models_source_digest())).encode()).hexdigest()[:32]


def _tree_to_json(tree) -> list | None:
    """[[path, shape, dtype, logical names or None], ...] of a tree of (logically partitioned)
    `ShapeDtypeStruct`s; None if it holds anything else (such a tree is not kept on disk)."""
    boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
    rows = []
    for path, leaf in flax.traverse_util.flatten_dict(tree, is_leaf=lambda _, x: boxed(x)).items():
        names = None
        if boxed(leaf):
            if leaf.mesh is not None or leaf.rules is not None:
                return None
            names, leaf = list(leaf.names), leaf.value
        if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is not None:
            return None
        rows.append([list(path), list(leaf.shape), leaf.dtype.name, names])
    return rows


def _tree_from_json(rows: list):
    flat = {}
    for path, shape, dtype, names in rows:
        leaf = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
        flat[tuple(path)] = leaf if names is None else nn.LogicallyPartitioned(leaf, tuple(names))
    return flax.traverse_util.unflatten_dict(flat)
