"""Name and tensor-layout maps between this project's Flax parameters and PyTorch state dicts.

The Flax module tree mirrors diffusers' module tree, so a parameter path translates to a diffusers key
segment by segment (`down_blocks_1/resnets_0/conv1/kernel` <-> `down_blocks.1.resnets.0.conv1.weight`),
and each leaf has a layout rule (PyTorch Linear `[out, in]` <-> Dense `[in, out]`, Conv
`[out, in, kh, kw]` <-> `[kh, kw, in, out]`). Both directions use the same table, so export is the
exact inverse of import.
"""

import re
from collections.abc import Callable

import numpy as np

# Flax module-name segment -> diffusers segment, for the names that differ beyond "name_i" -> "name.i".
_SEGMENT_RENAMES = {
    "downsampler": "downsamplers.0",
    "upsampler": "upsamplers.0",
    "to_out_0": "to_out.0",
}
# Inside a feed-forward block: ff/proj_in -> ff.net.0.proj, ff/proj_out -> ff.net.2.
_FF_RENAMES = {"proj_in": "net.0.proj", "proj_out": "net.2"}
_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks)_(\d+)$")


def diffusers_module_name(module_path: tuple[str, ...]) -> str:
    """('down_blocks_1', 'attentions_0', 'transformer_blocks_2', 'ff', 'proj_in') -> 'down_blocks.1...ff.net.0.proj'."""
    out = []
    for i, seg in enumerate(module_path):
        if i > 0 and module_path[i - 1] == "ff" and seg in _FF_RENAMES:
            out.append(_FF_RENAMES[seg])
        elif seg in _SEGMENT_RENAMES:
            out.append(_SEGMENT_RENAMES[seg])
        elif m := _INDEXED.match(seg):
            out.append(f"{m.group(1)}.{m.group(2)}")
        else:
            out.append(seg)
    return ".".join(out)


# A leaf rule: (torch leaf name, torch -> flax, flax -> torch).
LeafRule = tuple[str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def kept(torch_leaf: str) -> LeafRule:
    """A tensor stored as it is on both sides, under `torch_leaf` (a bias, a norm's weight, an embedding
    table, running statistics, a class token, ...)."""
    return (torch_leaf, lambda a: a, lambda a: a)


_IDENTITY: LeafRule = kept("bias")
_NORM_SCALE: LeafRule = kept("weight")
_LINEAR: LeafRule = ("weight", lambda a: a.T, lambda a: a.T)
_CONV: LeafRule = ("weight", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
# A 1x1 conv stored in PyTorch, a Dense here (SD 1.x proj_in/proj_out).
_CONV1X1_AS_LINEAR: LeafRule = ("weight", lambda a: a[:, :, 0, 0].T, lambda a: a.T[:, :, None, None])


def unet_leaf_rule(path: tuple[str, ...], flax_ndim: int, use_linear_projection: bool) -> LeafRule:
    """The layout rule for one UNet parameter, from its Flax path and rank."""
    leaf = path[-1]
    if leaf == "bias":
        return _IDENTITY
    if leaf == "scale":
        return _NORM_SCALE
    if leaf != "kernel":
        raise KeyError(f"no layout rule for parameter {'/'.join(path)}")
    if flax_ndim == 4:
        return _CONV
    if path[-2] in ("proj_in", "proj_out") and path[-3].startswith("attentions_") and not use_linear_projection:
        return _CONV1X1_AS_LINEAR
    return _LINEAR


def unet_torch_key(path: tuple[str, ...], flax_ndim: int, use_linear_projection: bool) -> tuple[str, LeafRule]:
    """Flax UNet parameter path -> (diffusers state-dict key, layout rule)."""
    rule = unet_leaf_rule(path, flax_ndim, use_linear_projection)
    return f"{diffusers_module_name(path[:-1])}.{rule[0]}", rule
