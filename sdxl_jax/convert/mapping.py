"""Strict conversion between a PyTorch state dict and a Flax parameter tree, and the one strict check.

`check_tensors` compares what a checkpoint or tree holds with what the model needs, by name and shape,
and raises one ConversionError naming every missing, unexpected and mis-shaped tensor; `check_tree` is
that check for a Flax tree against its abstract tree. Every converter and loader checks through them.

Given the abstract Flax tree (from `jax.eval_shape`) and a function naming the PyTorch key and layout
rule of every Flax leaf, `torch_to_flax` checks the state dict against the PyTorch shapes the tree
implies, then converts: every source key consumed exactly once (apart from named ignorable buffers),
every target parameter produced exactly once. `flax_to_torch` is its inverse.
"""

import concurrent.futures
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import flax
import numpy as np
from flax.linen import meta

from sdxl_jax.convert.torch_layouts import LeafRule

PLACERS = 3  # threads placing tensors at once when loading onto devices (`torch_to_flax(place=...)`)

# Buffers that released checkpoints may carry and that no parameter corresponds to.
IGNORABLE_SUFFIXES = ("position_ids", "logit_scale", "denoiser.sigmas")

Shape = tuple[int, ...]
KeyFn = Callable[[tuple[str, ...], int], tuple[str, LeafRule]]
# (Flax path, the PyTorch tensor as read, its layout rule's torch -> Flax function) -> the leaf the tree
# holds there (e.g. a device array, laid out and cast on the device)
LeafPlacer = Callable[[tuple[str, ...], np.ndarray, Callable[[Any], Any]], Any]


class ConversionError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


def offenders(missing=(), unexpected=(), mismatched=()) -> str:
    """The offender lists as an error message's body: per kind a count and the first 20, sorted."""
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = "\n    ".join(sorted(items)[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            parts.append(f"  {title} ({len(items)}):\n    {shown}{more}")
    return "\n".join(parts)


def shape_of(state: Mapping, key: str) -> tuple[int, ...]:
    """A tensor's shape without reading it where the mapping knows it (the lazy readers here)."""
    return tuple(state.shape(key)) if hasattr(state, "shape") else tuple(np.shape(state[key]))


def dtype_of(state: Mapping, key: str) -> np.dtype:
    return np.dtype(state.dtype(key)) if hasattr(state, "dtype") else np.asarray(state[key]).dtype


def check_tensors(
    what: str,
    have: Mapping[str, Shape | None],
    want: Mapping[str, Shape | None],
    ignorable: Collection[str] = (),
    notes: Mapping[str, str] | None = None,
) -> None:
    """Raise ConversionError(`what`: the offenders) unless `have` holds exactly `want`'s tensors and shapes.

    have, want: tensor name -> shape; a shape of None (not known yet) is not compared. ignorable: names
    `have` may hold without `want` asking for them. notes: name -> text added to its shape mismatch.
    """
    notes = notes or {}
    missing = [k for k in want.keys() - have.keys()]
    unexpected = [k for k in have.keys() - want.keys() if k not in ignorable]
    mismatched = [
        f"{k}: {tuple(have[k])}, expected {tuple(want[k])}{notes.get(k, '')}"
        for k in want.keys() & have.keys()
        if have[k] is not None and want[k] is not None and tuple(have[k]) != tuple(want[k])
    ]
    if missing or unexpected or mismatched:
        raise ConversionError(f"{what}:\n{offenders(missing, unexpected, mismatched)}")


def tree_shapes(tree) -> dict[str, Shape]:
    """`"a/b/kernel"` -> shape, for every leaf of a nested param tree (arrays or `ShapeDtypeStruct`s)."""
    return {"/".join(k): tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(meta.unbox(tree)).items()}


def check_tree(what: str, params, abstract) -> None:
    """Raise ConversionError naming every parameter of `params` missing, unexpected or mis-shaped against
    `abstract` (the config's tree from `jax.eval_shape`), by its `/`-joined path."""
    check_tensors(what, tree_shapes(params), tree_shapes(abstract))


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


def torch_shapes(abstract_params, key_fn: KeyFn) -> dict[str, Shape]:
    """PyTorch key -> PyTorch shape of every leaf of a (boxed or unboxed) abstract Flax tree.

    The layout rules run on zero-stride placeholders of the Flax shapes: nothing is allocated.
    """
    abstract_params = meta.unbox(abstract_params)
    flat = flax.traverse_util.flatten_dict(abstract_params)
    return {
        key: to_torch(np.broadcast_to(np.float32(0), flat[path].shape)).shape
        for path, (key, (_, _, to_torch)) in key_table(abstract_params, key_fn).items()
    }


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    abstract_params,
    key_fn: KeyFn,
    *,
    dtype=None,
    ignorable: Iterable[str] = IGNORABLE_SUFFIXES,
    what: str = "checkpoint",
    place: LeafPlacer | None = None,
):
    """Nested Flax params from a `{key: array}` state dict, strictly.

    abstract_params: unboxed tree of `ShapeDtypeStruct` (the target); dtype: cast to this (default:
    the target's dtype); ignorable: suffixes of the state-dict keys that may be present unasked.
    Every tensor is checked (in PyTorch layout, shapes from a lazy mapping's headers) before any is
    read. Tensors are then read one at a time, in the state dict's order; each leaf is numpy (laid out
    and cast here), or what `place(path, tensor, to_flax)` makes of the tensor as read (a `LeafPlacer`:
    e.g. a device array, the host copy dropped before the next tensor is read, so a whole model never
    exists twice in host memory).
    """
    have = {key: shape_of(state_dict, key) for key in state_dict.keys()}
    skipped = {key for key in have if key.endswith(tuple(ignorable))}
    check_tensors(f"{what} does not match the model", have, torch_shapes(abstract_params, key_fn), skipped)
    flat_abstract = flax.traverse_util.flatten_dict(abstract_params)
    table = key_table(abstract_params, key_fn)
    order = {key: i for i, key in enumerate(state_dict.keys())}  # file order: reads go front to back
    leaves = sorted(table.items(), key=lambda item: order[item[1][0]])
    if place is None:
        out = {
            path: to_flax(np.asarray(state_dict[key])).astype(dtype or flat_abstract[path].dtype, copy=False)
            for path, (key, (_, to_flax, _)) in leaves
        }
    else:  # reads, host copies and device work of a few tensors overlap; at most PLACERS tensors in flight
        with concurrent.futures.ThreadPoolExecutor(PLACERS) as pool:
            work = lambda leaf: place(leaf[0], np.asarray(state_dict[leaf[1][0]]), leaf[1][1][1])
            out = dict(zip((path for path, _ in leaves), pool.map(work, leaves), strict=True))
    return flax.traverse_util.unflatten_dict(out)


def flax_to_torch(params, key_fn: KeyFn) -> dict[str, np.ndarray]:
    """The PyTorch `{key: array}` state dict of a Flax param tree (the inverse of `torch_to_flax`)."""
    flat = flax.traverse_util.flatten_dict(params)
    table = key_table(params, key_fn)
    return {
        key: np.ascontiguousarray(to_torch(np.asarray(flat[path]))) for path, (key, (_, _, to_torch)) in table.items()
    }
