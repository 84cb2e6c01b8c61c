"""What one compile of the planner gives and how it is reported: `Compiled` (memory, HBM traffic, model
FLOPs per device, or the compiler's refusal), `measure` (a lowered program -> `Compiled`), the largest
batch that fits (`largest_batch`, by compiling) and the printout (`report`). `memory_plan` builds the
programs; nothing here knows about configs or models.
"""

import dataclasses
import math
import os
import re
import time

import jax

from sdxl_jax.train.hlo_traffic import memory_traffic
from sdxl_jax.train.targets import GiB, Target, roofline


@dataclasses.dataclass
class Compiled:
    """One compile's figures, per device: memory (bytes), HBM traffic (bytes), model FLOPs."""

    global_batch: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    traffic: float
    flops_per_device: float
    seconds: float
    refused: str = ""  # the compiler's out-of-memory message, when it would not compile the program

    @property
    def total(self) -> float:
        """Bytes live at the peak: arguments + outputs not aliased to (donated) arguments + temporaries.
        For a refused program, the temporaries its message names (a lower bound), else infinity."""
        if self.refused:
            return self.temporaries or math.inf
        return self.arguments + self.outputs - self.aliased + self.temporaries


# XLA's TPU compiler refuses a program over the chip's memory with e.g. "RESOURCE_EXHAUSTED: Ran out of
# memory on HBM, the total memory required for HLO temporaries (21.30G) exceeds available HBM (15.75G)"
# (binary units).
_REFUSED_TEMPORARIES = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def _refused(error: Exception, flops: float, devices: int, global_batch: int, start: float) -> Compiled:
    message = str(error).splitlines()[0]
    found = _REFUSED_TEMPORARIES.search(str(error))
    temporaries = int(float(found[1]) * 1024 ** "KMGT".index(found[2]) * 1024) if found else 0
    return Compiled(global_batch, 0, 0, 0, temporaries, 0.0, flops / devices, time.perf_counter() - start, message)


def measure(lowered, flops: float, devices: int, global_batch: int, start: float, hlo_path=None) -> Compiled:
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _refused(e, flops, devices, global_batch, start)
    text = compiled.as_text()
    if hlo_path:
        os.makedirs(os.path.dirname(hlo_path) or ".", exist_ok=True)
        with open(hlo_path, "w") as f:
            f.write(text)
    mem = compiled.memory_analysis()
    return Compiled(global_batch, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                    mem.temp_size_in_bytes, memory_traffic(text), flops / devices,
                    time.perf_counter() - start)  # fmt: skip


def largest_batch(compile_at, first: int, first_result: Compiled, hbm: float, limit: int) -> tuple[int, list]:
    """The largest batch per device in [1, limit] whose program fits `hbm` bytes, by compiling.

    Memory is close to affine in the batch, so a second compile predicts the answer; then the bracket
    [largest known fit, smallest known miss] is closed by compiling: one above the prediction when
    it holds, bisection where a layout change broke it. Returns (batch, [(batch, total bytes)] of every
    compile); 0 if batch 1 does not fit.
    """
    seen = {first: first_result.total}

    def compile_total(b: int) -> None:
        if b not in seen:
            seen[b] = compile_at(b).total

    other = 2 * first if seen[first] <= hbm and 2 * first <= limit else first - 1
    guess = first
    if other >= 1:
        compile_total(other)
        slope = (seen[other] - seen[first]) / (other - first)
        guess = first + int((hbm - seen[first]) // slope) if slope > 0 else limit
    compile_total(min(max(guess, 1), limit))
    step = 1
    while True:
        lo = max((b for b, total in seen.items() if total <= hbm), default=0)
        hi = min((b for b, total in seen.items() if total > hbm and b > lo), default=limit + 1)
        if hi == lo + 1:
            return lo, sorted(seen.items())
        if hi <= limit:
            compile_total((lo + hi) // 2)
        else:
            compile_total(min(limit, lo + step))
            step *= 2


def _tera(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.2f} GFLOP"


def report(
    target: Target, what: str, c: Compiled, devices: int, search=None, per_example: str = "example", batch_limit=None
) -> str:
    """The planner's printout (one figure per line, the units stated); `search` is `largest_batch`'s
    result, `batch_limit` the limit it searched to."""
    lines = [f"{what} on {target} ({devices} devices), global batch {c.global_batch}, compiled in {c.seconds:.0f} s"]
    if c.refused:  # no memory plan exists: the compiler stopped at its out-of-memory check
        need = f"its temporaries alone {c.temporaries / GiB:.2f} GiB" if c.temporaries else "more than the chip"
        lines.append(f"per device: does NOT fit; the compiler refused the program ({need}): {c.refused}")
    else:
        lines.append("per device:")
        for key in ("arguments", "outputs", "aliased", "temporaries", "total"):
            value = c.total if key == "total" else getattr(c, key)
            lines.append(f"  {key:<12} {value / GiB:8.2f} GiB  ({value / 2**20:.1f} MiB)")
    flops, call = c.flops_per_device * devices, "step" if per_example == "example" else "call"
    lines.append(
        f"FLOPs per {call}: {_tera(flops)} ({_tera(c.flops_per_device)} per device, "
        f"{_tera(flops / c.global_batch)} per {per_example})"
    )
    if not c.refused:
        lines.append(f"HBM traffic per device: {c.traffic / 1e9:.2f} GB")
    if target.chip is None:
        return "\n".join(lines)
    hbm, peak, bandwidth = target.per_device(devices)
    if not c.refused:
        verdict = "fits" if c.total <= hbm else f"does NOT fit (over by {(c.total - hbm) / GiB:.2f} GiB)"
        lines.append(f"HBM per device {hbm / GiB:.2f} GiB: {verdict} ({c.total / hbm:.0%} used)")
    if search is not None:
        best, tried = search
        shown = ", ".join(f"{b}: {t / GiB:.2f}" for b, t in tried)  # a refused program: its lower bound or inf
        at_limit = " (the search limit, --batch_limit)" if best == batch_limit else ""
        lines.append(f"largest batch per device that fits: {best}{at_limit} (compiled, GiB per device: {shown})")
    if c.refused:
        return "\n".join(lines)
    r = roofline(c.flops_per_device, c.traffic, peak, bandwidth)
    ms = lambda seconds: f"{seconds * 1e3:.1f}" if seconds >= 1e-3 else f"{seconds * 1e3:.4f}"
    lines.append(
        f"roofline lower bound: {ms(r['bound_s'])} ms per {call} (compute {ms(r['compute_s'])} ms at "
        f"{peak / 1e12:.0f} TFLOP/s, memory {ms(r['memory_s'])} ms at {bandwidth / 1e9:.0f} GB/s); "
        f"MFU ceiling {r['mfu_ceiling']:.0%}"
    )
    if per_example == "image":
        lines.append(f"roofline images/s per device: {c.global_batch / devices / r['bound_s']:.2f}")
    lines.append("(compiler plans and roofline bounds, not timings)")
    return "\n".join(lines)
