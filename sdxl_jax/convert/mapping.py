"""Strict conversion between a PyTorch state dict and a Flax parameter tree.

Given the abstract Flax tree (from `jax.eval_shape`) and a function naming the PyTorch key and layout
rule of every Flax leaf, `torch_to_flax` consumes every source key exactly once and produces every
target parameter exactly once, or raises naming every offender. `flax_to_torch` is its inverse.
"""

from collections.abc import Callable, Iterable, Mapping

import flax
import numpy as np

from sdxl_jax.convert.torch_layouts import LeafRule

# Buffers that released checkpoints may carry and that no parameter corresponds to.
IGNORABLE_SUFFIXES = ("position_ids", "logit_scale", "denoiser.sigmas")

KeyFn = Callable[[tuple[str, ...], int], tuple[str, LeafRule]]


class ConversionError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


def _problems(missing, unexpected, mismatched) -> str:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = "\n    ".join(sorted(items)[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            parts.append(f"  {title} ({len(items)}):\n    {shown}{more}")
    return "\n".join(parts)


def key_table(abstract_params, key_fn: KeyFn) -> dict[tuple[str, ...], tuple[str, LeafRule]]:
    """Flax path -> (torch key, rule) for every leaf; raises if two leaves claim one torch key."""
    flat = flax.traverse_util.flatten_dict(abstract_params)
    table = {path: key_fn(path, len(leaf.shape)) for path, leaf in flat.items()}
    seen: dict[str, tuple[str, ...]] = {}
    for path, (key, _) in table.items():
        if key in seen:
            raise ConversionError(f"{'/'.join(path)} and {'/'.join(seen[key])} both map to {key}")
        seen[key] = path
    return table


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    abstract_params,
    key_fn: KeyFn,
    *,
    dtype=None,
    ignorable: Iterable[str] = IGNORABLE_SUFFIXES,
    what: str = "checkpoint",
):
    """Nested Flax params (numpy) from a `{key: array}` state dict, strictly.

    abstract_params: unboxed tree of `ShapeDtypeStruct` (the target); dtype: cast to this (default:
    the target's dtype).
    """
    flat_abstract = flax.traverse_util.flatten_dict(abstract_params)
    table = key_table(abstract_params, key_fn)
    out, missing, mismatched = {}, [], []
    for path, (key, (_, to_flax, _)) in table.items():
        if key not in state_dict:
            missing.append(key)
            continue
        value = to_flax(np.asarray(state_dict[key]))
        want = flat_abstract[path]
        if value.shape != want.shape:
            mismatched.append(f"{key}: {tuple(state_dict[key].shape)} -> {value.shape}, expected {want.shape}")
            continue
        out[path] = value.astype(dtype or want.dtype, copy=False)
    used = {key for key, _ in table.values()}
    unexpected = [k for k in state_dict if k not in used and not k.endswith(tuple(ignorable))]
    if missing or unexpected or mismatched:
        raise ConversionError(f"{what} does not match the model:\n{_problems(missing, unexpected, mismatched)}")
    return flax.traverse_util.unflatten_dict(out)


def flax_to_torch(params, key_fn: KeyFn) -> dict[str, np.ndarray]:
    """The PyTorch `{key: array}` state dict of a Flax param tree (the inverse of `torch_to_flax`)."""
    flat = flax.traverse_util.flatten_dict(params)
    table = key_table(params, key_fn)
    return {key: np.ascontiguousarray(to_torch(np.asarray(flat[path]))) for path, (key, (_, _, to_torch)) in table.items()}
