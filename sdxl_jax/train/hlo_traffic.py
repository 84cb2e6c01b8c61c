"""Memory traffic of a compiled XLA program, loops counted as many times as they run.

    compiled = jax.jit(step, in_shardings=..., out_shardings=...).lower(*abstract_args).compile()
    traffic = memory_traffic(compiled.as_text())     # bytes one device moves, for the roofline's memory term

XLA's `compiled.cost_analysis()["bytes accessed"]` counts the body of a `while` loop once, and every
`nn.scan` over stacked layers and every sampler's `lax.scan` is one; this counts it times its trip count.
Otherwise it keeps HloCostAnalysis' convention: each top-level instruction of ENTRY and of the
computations it calls (while body and condition, call, the costlier conditional branch, async wrappers)
reads its operands and writes its output; a fusion is one instruction (its intermediates stay on chip)
that reads of each parameter only what its slices and dynamic slices take, and of a root
dynamic-update-slice writes only the update; parameters, constants, tuples, get-tuple-element and
bitcasts are free. An async pair (`copy-start`/`copy-done`, `all-gather-start`/`-done`, ...) counts its
operands at the start and its result at the done, once — XLA counts the start's tuple of buffers as well.

Bytes are HBM bytes, as laid out: a TPU layout's tiles (`T(8,128)`: a minor dimension of 32 moves as 128)
pad the array as XLA's TPU count does; an array the compiler placed in another memory space (`S(1)`,
a TPU's on-chip VMEM; `S(2)`) moves no HBM bytes and counts 0, so an HBM -> VMEM prefetch counts its
HBM read once. XLA's own figure counts VMEM operands too, which would put a roofline's memory term far
above what HBM moves.
The optimised TPU HLO carries no `known_trip_count`; the count is then read off the loop's counter
(`compare(i, N)` in the condition, `i + step` in the body, the initial `i` in the while's operand tuple).
A loop whose count is found neither way counts once and is named in `HloTraffic.uncounted_loops`.
"""

import math
import re
import warnings
from typing import NamedTuple

_SIZES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_SIZES |= {"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
         "partition-id", "replica-id", "opt-barrier", "domain", "async-update", "async-done"}  # fmt: skip
_INSTRUCTION = re.compile(r"\s*(ROOT )?%?(\S+) = ")
_COMPUTATION = re.compile(r"(ENTRY )?%?(\S+) \(.*\) -> .* \{$")


class Instr(NamedTuple):
    root: bool
    name: str
    shape: str  # e.g. "f32[256,512]{1,0:T(8,128)}" or a tuple "(s32[], bf16[6,512,512]{...})"
    op: str
    args: str  # the text inside the parentheses: operand names, or a parameter's / constant's value
    attrs: str
    operands: list[str]


class HloTraffic(NamedTuple):
    bytes: float
    uncounted_loops: list[str]  # while loops of unknown trip count, counted once


def _arrays(shape: str) -> list[tuple[str, int]]:
    """(element type, element count in HBM) of each array in a shape, counted as laid out in memory: a
    tiled layout (`{1,0:T(8,128)(2,1)}`) pads its most-minor dimensions up to the first tile; an array in
    another memory space than the default (`S(1)`: a TPU's on-chip VMEM) counts 0."""
    out = []
    for dtype, dims, layout in re.findall(r"([a-z][a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?", shape):
        sizes = [int(d.lstrip("<=")) for d in dims.split(",") if d]
        if re.search(r"S\([1-9]\d*\)", layout):
            out.append((dtype, 0))
            continue
        tile = re.search(r":(?:[^:]*?)T\(([\d,]+)\)", layout)
        if tile and sizes:  # (XLA's count takes a tiled scalar as its own size)
            order = [int(i) for i in layout[1:].split(":")[0].split(",") if i]  # minor to major
            physical = [sizes[i] for i in reversed(order)] if order else sizes
            tile_dims = [int(t) for t in tile.group(1).split(",")]
            physical = [1] * (len(tile_dims) - len(physical)) + physical
            for j, t in enumerate(tile_dims, start=len(physical) - len(tile_dims)):
                physical[j] = -(-physical[j] // t) * t
            sizes = physical
        out.append((dtype, math.prod(sizes)))
    return out


def _arrays_text(shape: str) -> list[str]:
    """Each array of a (tuple) shape as its own shape text, layout included."""
    return re.findall(r"[a-z][a-z0-9]*\[[^\]]*\](?:\{[^}]*\})?", shape)


def shape_bytes(shape: str) -> float:
    """Bytes of an array or (nested) tuple shape: the sum of its arrays' (an unknown type is a KeyError)."""
    size = lambda t: 1 if t.startswith("f8") else 0.5 if t.startswith("f4") else 0 if t == "token" else _SIZES[t]
    return sum(size(dtype) * n for dtype, n in _arrays(shape))


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group that opens at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _parse_instruction(line: str) -> Instr:
    m = _INSTRUCTION.match(line)
    rest = line[m.end() :]
    shape_end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
    open_ = rest.index("(")
    close = _balanced(rest, open_)
    args = rest[open_ + 1 : close - 1]
    return Instr(bool(m[1]), m[2], shape, rest[:open_], args, rest[close:], re.findall(r"%([^\s,()]+)", args))


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Instr]], str]:
    """Computations of an HLO module's text, each {instruction name: Instr} in order, and ENTRY's name."""
    comps, entry, current = {}, None, None
    for line in _logical_lines(text):
        if (m := _COMPUTATION.match(line)) and not line.startswith(" "):
            current = comps.setdefault(m[2], {})
            entry = m[2] if m[1] else entry
        elif current is not None and _INSTRUCTION.match(line):
            instr = _parse_instruction(line)
            current[instr.name] = instr
        elif line == "}":
            current = None
    return comps, entry


def _logical_lines(text: str):
    """The module's lines with each instruction whole: attribute values may span lines (a Pallas kernel's
    `frontend_attributes` hold JSON with newlines), so a line that starts neither an instruction, a
    computation nor a computation's closing `}` continues the one before."""
    pending = None
    for line in text.splitlines():
        header = not line.startswith((" ", "}", '"')) and (line.startswith("HloModule") or _COMPUTATION.match(line))
        starts = line == "}" or not line.strip() or header or (line.startswith("  ") and _INSTRUCTION.match(line))
        if starts:
            if pending is not None:
                yield pending
            pending = line
        else:
            pending = line if pending is None else pending + line
    if pending is not None:
        yield pending


def _root(comp: dict[str, Instr]) -> Instr:
    return next(i for i in comp.values() if i.root)


def _called(instr: Instr, key: str) -> list[str]:
    """Names of the computations an attribute names: `body=%b`, `branch_computations={%a, %b}`."""
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[^\s,]+)", instr.attrs)
    return re.findall(r"%?([^\s,{}]+)", m[1]) if m else []


def _partial_read(user: Instr, name: str) -> float | None:
    """Bytes `user` reads of value `name` when it takes only a slice of it; None when it reads it whole."""
    if user.op == "slice" or (user.op == "dynamic-slice" and user.operands[0] == name):
        return shape_bytes(user.shape)
    return 0.0 if user.op == "dynamic-update-slice" and user.operands[0] == name else None  # updated in place


def _fused_reads(comps: dict, comp: dict[str, Instr], name: str) -> float:
    """Bytes a fused computation reads of its value `name` (a parameter): what slices take, whole
    otherwise — once for all users that can share the read, once per broadcast or reshape (XLA's rule)."""
    size, total, whole = shape_bytes(comp[name].shape), 0.0, False
    for user in (i for i in comp.values() if name in i.operands):
        if user.op == "get-tuple-element":  # a tuple parameter: each element read on its own
            total += _fused_reads(comps, comp, user.name)
        elif user.op in ("broadcast", "reshape"):
            total += size
        elif user.op == "fusion":  # nested: read as the inner computation reads its parameter
            inner = comps[_called(user, "calls")[0]]
            for index in (k for k, o in enumerate(user.operands) if o == name):
                param = next(i for i in inner.values() if i.op == "parameter" and int(i.args) == index)
                root = _root(inner)
                simple = not root.operands or root.operands[0] == param.name  # a wrapper: slices of it are slices
                parts = [_partial_read(u, user.name) if simple else None for u in comp.values()
                         if user.name in u.operands] or [None]  # fmt: skip
                total += sum(p for p in parts if p is not None)
                total += _fused_reads(comps, inner, param.name) if None in parts else 0.0
        elif (part := _partial_read(user, name)) is not None:
            total += part
        else:
            whole = True
    return total + (size if whole else 0.0)


def _fusion_traffic(comps: dict, instr: Instr) -> float:
    """What one fusion reads (its parameters, as `_fused_reads`; its array constants) and writes (its
    outputs; of a root dynamic-update-slice, the update only: the rest of the buffer stays in place)."""
    fused = comps[_called(instr, "calls")[0]]
    root = _root(fused)
    outputs = [fused[o] for o in root.operands] if root.op == "tuple" else [root]
    updates = [fused[o.operands[1]] if o.op == "dynamic-update-slice" else o for o in outputs]
    read = sum(_fused_reads(comps, fused, i.name) for i in fused.values() if i.op == "parameter")
    arrays = [i for i in fused.values() if i.op == "constant" and _arrays(i.shape)[0][1] > 1]
    return sum(shape_bytes(i.shape) for i in updates + arrays) + read


def _through(comp: dict[str, Instr], name: str) -> Instr:
    """The instruction behind `name`, past copies and converts (the TPU copies its loop counters)."""
    instr = comp[name]
    while instr.op in ("copy", "convert"):
        instr = comp[instr.operands[0]]
    return instr


def _constant(comp: dict[str, Instr], name: str) -> int | None:
    instr = _through(comp, name)
    return int(instr.args) if instr.op == "constant" and re.fullmatch(r"-?\d+", instr.args) else None


def _element(comp: dict[str, Instr], name: str) -> int | None:
    """Which element of the computation's tuple parameter `name` is, or None."""
    instr = _through(comp, name)
    if instr.op == "get-tuple-element" and comp[instr.operands[0]].op == "parameter":
        return int(re.search(r"index=(\d+)", instr.attrs)[1])
    return None


def trip_count(comps: dict, comp: dict[str, Instr], loop: Instr) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count`, else read off a counter `i` of the loop's
    tuple: the condition's root `i < N` (or `<=`, or `N > i`), the body's `i + step`, a constant start."""
    if m := re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs):
        return int(m[1])
    cond, body = comps[_called(loop, "condition")[0]], comps[_called(loop, "body")[0]]
    compare, init, body_root = _root(cond), comp[loop.operands[0]], _root(body)
    if compare.op != "compare" or init.op != "tuple" or body_root.op != "tuple":
        return None
    (i, bound), direction = compare.operands, re.search(r"direction=(\w+)", compare.attrs)[1]
    if _element(cond, i) is None:
        (bound, i), direction = (i, bound), {"GT": "LT", "GE": "LE"}.get(direction)
    index, bound = _element(cond, i), _constant(cond, bound)
    if index is None or bound is None or direction not in ("LT", "LE"):
        return None
    start, update = _constant(comp, init.operands[index]), _through(body, body_root.operands[index])
    counter = [o for o in update.operands if _element(body, o) == index] if update.op == "add" else []
    step = _constant(body, update.operands[1 - update.operands.index(counter[0])]) if len(counter) == 1 else None
    if start is None or step is None or step <= 0:
        return None
    return max(0, math.ceil((bound + (direction == "LE") - start) / step))


def _traffic(comps: dict, name: str, uncounted: list[str]) -> float:
    comp, total = comps[name], 0.0
    operands = lambda instr: sum(shape_bytes(comp[o].shape) for o in instr.operands)
    for instr in comp.values():
        op, out = instr.op, shape_bytes(instr.shape)
        if op in _FREE:
            continue
        scratch = _arrays_text(instr.shape)[-1] if instr.shape.startswith("(") else ""
        if op == "custom-call" and scratch[:3] in ("s8[", "u8[") and '_target="__cu' in instr.attrs:
            out -= shape_bytes(scratch)  # a cuBLAS / cuDNN call's workspace: scratch, not a result
        if op == "while":
            if (n := trip_count(comps, comp, instr)) is None:
                n = 1
                uncounted.append(instr.name)
            body, cond = _called(instr, "body")[0], _called(instr, "condition")[0]
            total += n * _traffic(comps, body, uncounted) + (n + 1) * _traffic(comps, cond, uncounted)
        elif op in ("call", "async-start"):
            total += sum(_traffic(comps, c, uncounted) for c in _called(instr, "to_apply") + _called(instr, "calls"))
        elif op == "conditional":
            branches = _called(instr, "branch_computations") + _called(instr, "true_computation")
            branches += _called(instr, "false_computation")
            total += max(_traffic(comps, b, uncounted) for b in branches)
        elif op == "fusion":
            total += _fusion_traffic(comps, instr)
        elif op.endswith("-start") or op.endswith("-done"):  # reads at the start, writes at the done
            total += operands(instr) if op.endswith("-start") else out
        elif op in ("dynamic-slice", "gather"):  # the slice read, written, and its indices
            total += 2 * out + operands(instr) - shape_bytes(comp[instr.operands[0]].shape)
        elif op == "dynamic-update-slice":  # the update read and written in place, and its indices
            total += operands(instr) + shape_bytes(comp[instr.operands[1]].shape) - out
        elif op == "scatter":  # operands, indices, updates: the updated part read, written, and the updates
            n = len(instr.operands) // 2
            updates = sum(shape_bytes(comp[o].shape) for o in instr.operands[n + 1 :])
            total += 3 * updates + shape_bytes(comp[instr.operands[n]].shape)
        elif op == "slice":
            total += 2 * out
        else:
            total += operands(instr) + out
    return total


def hlo_traffic(hlo_text: str) -> HloTraffic:
    """Bytes the optimised HLO module (`compiled.as_text()`) reads and writes, loops times their counts."""
    comps, entry = parse_hlo(hlo_text)
    uncounted = []
    return HloTraffic(_traffic(comps, entry, uncounted), uncounted)


def memory_traffic(hlo_text: str) -> float:
    """`hlo_traffic(...).bytes`, warning about loops whose trip count is unknown (counted once)."""
    traffic = hlo_traffic(hlo_text)
    if traffic.uncounted_loops:
        warnings.warn(f"while loops of unknown trip count counted once: {traffic.uncounted_loops}", stacklevel=2)
    return traffic.bytes
