"""Model FLOPs of a traced program: the matmuls and convolutions of its jaxpr, 2 FLOPs per multiply-add.

    traced = jax.jit(step).trace(state, frozen, batch)
    flops = jaxpr_flops(traced.jaxpr)       # the whole (global) step, every device together

What MFU divides by. XLA's cost analysis is not used for it: it counts the body of a `while` loop once
(every `nn.scan` over stacked layers becomes one), and the partitioned program's count changes with
the activation constraints. The jaxpr is the program before partitioning, with each scan's
length known. Elementwise work (norms, activations, softmax, the optimiser) is left out, as in the
usual MFU definitions. Rematerialised forward passes are counted where a program has them (they are
in its jaxpr); `step.model_flops` traces the step without remat, so MFU leaves them out. Kernels
behind custom calls (a cuDNN or Pallas attention) are invisible here and count 0. Equations whose
results nothing uses are not counted, as XLA drops them (the autoencoder step applies its VAE pullback
three times and reads only the last layer's gradient from two of them).
"""

import math

from jax.extend import core


def _dot_general(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _conv(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(out) * math.prod(rhs) / out_features  # each output sums (in features / groups) x window


def _sub_jaxprs(value):
    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def live_equations(jaxpr) -> list:
    """The equations of a `Jaxpr` that its outputs depend on (or that have effects), in order."""
    used = {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in used for v in eqn.outvars):
            live.append(eqn)
            used.update(v for v in eqn.invars if isinstance(v, core.Var))
    return live[::-1]


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of a `Jaxpr` or `ClosedJaxpr`: dot_general + conv of its live equations, scans times their
    length, the costlier branch of a cond, while loops once (their trip count is not in the jaxpr)."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr
    total = 0.0
    for eqn in live_equations(jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general(eqn)
        elif name == "conv_general_dilated":
            total += _conv(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total
