"""The adversarial terms of adversarial diffusion distillation (ADD eq. 2/3), in pure functions over the
per-head logits of `models.projected_discriminator` (a sequence of `[B, N_k]` arrays, one per head):

    L_G = -sum_k mean_{b,n} D_k(fake)
    L_D =  sum_k mean_{b,n} relu(1 - D_k(real)) + sum_k mean_{b,n} relu(1 + D_k(fake)) + R1
    R1  =  sum_k gamma / 2 * mean_b |grad_{F_k} sum_n D_k(F_k(real))_b|²      gamma = 1e-5

Heads: ADD sums its hinge terms over the heads k (`heads="sum"`, the default); StyleGAN-T's code takes
one mean over all heads' logits together, which `heads="mean"` gives (the mean of the per-head means;
the same thing when every head has as many tokens, as on DINOv2). Within a head the logits of all
examples and tokens are averaged.

R1 (ADD §3.2: "on the input of each discriminator head"): the gradient is taken with respect to each
head's input features F_k `[B, N, C]` (after the readout), at the real images, of the head's logits
summed over tokens (`tokens="sum"`: the head's output read as one score per image, as StyleGAN2's R1
differentiates `logits.sum()`; `tokens="mean"` differentiates the token mean instead, N² times
smaller). Its squared norm over tokens and channels is averaged over the examples and scaled by
gamma / 2 (the R1 of Mescheder et al.; ADD writes gamma R1 without the norm's form), and the heads are
combined as the hinge terms are. The gradient of all heads comes from one backward pass of the sum of
every head's score, since head k reads F_k alone; LocalBatchNorm makes an example's logits depend on
the others of its group, and those cross terms are part of the gradient, as in any batch-normalised R1.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

HeadReduction = Literal["sum", "mean"]
TokenReduction = Literal["sum", "mean"]
R1_GAMMA = 1e-5  # ADD §4

Logits = Sequence[jax.Array]


def combine_heads(per_head: Sequence[jax.Array], heads: HeadReduction) -> jax.Array:
    """Per-head scalars -> one: their sum (ADD) or their mean (StyleGAN-T, equal token counts)."""
    total = sum(jnp.asarray(x, jnp.float32) for x in per_head)
    if heads == "sum":
        return total
    if heads == "mean":
        return total / len(per_head)
    raise ValueError(f"heads must be 'sum' or 'mean', got {heads!r}")


def _per_head_mean(logits: Logits, fn) -> list[jax.Array]:
    return [jnp.mean(fn(x.astype(jnp.float32))) for x in logits]


def discriminator_hinge_terms(
    real_logits: Logits, fake_logits: Logits, heads: HeadReduction = "sum"
) -> tuple[jax.Array, jax.Array]:
    """`(combine_k mean relu(1 - D_k(real)), combine_k mean relu(1 + D_k(fake)))`."""
    real = combine_heads(_per_head_mean(real_logits, lambda x: jax.nn.relu(1.0 - x)), heads)
    fake = combine_heads(_per_head_mean(fake_logits, lambda x: jax.nn.relu(1.0 + x)), heads)
    return real, fake


def discriminator_hinge_loss(real_logits: Logits, fake_logits: Logits, heads: HeadReduction = "sum") -> jax.Array:
    """The discriminator's hinge loss, the real and the fake term summed (R1 not included)."""
    real, fake = discriminator_hinge_terms(real_logits, fake_logits, heads)
    return real + fake


def generator_hinge_loss(fake_logits: Logits, heads: HeadReduction = "sum") -> jax.Array:
    """The student's adversarial loss `-combine_k mean D_k(fake)`."""
    return -combine_heads(_per_head_mean(fake_logits, lambda x: x), heads)


def r1_penalty(
    logits_fn: Callable[[list[jax.Array]], tuple[Logits, Any]],
    features: Sequence[jax.Array],
    gamma: float = R1_GAMMA,
    heads: HeadReduction = "sum",
    tokens: TokenReduction = "sum",
) -> tuple[jax.Array, Logits, Any]:
    """R1 on the heads' inputs (see the module docstring) -> `(penalty, logits, aux)`.

    logits_fn: head inputs (a list like `features`) -> `(per-head logits [B, N_k], aux)`, e.g. the
    discriminator applied in training mode with `aux` its `spectral` updates. Its logits at `features`
    are returned, so one forward serves the real hinge term and R1; the penalty is differentiable with
    respect to whatever `logits_fn` closes over (the heads' parameters).
    """
    if tokens not in ("sum", "mean"):
        raise ValueError(f"tokens must be 'sum' or 'mean', got {tokens!r}")

    def score(f):
        logits, aux = logits_fn(f)
        per_head = [x.astype(jnp.float32) for x in logits]
        if tokens == "mean":
            per_head = [x.mean(axis=1) for x in per_head]
        return sum(jnp.sum(x) for x in per_head), (logits, aux)

    (_, (logits, aux)), grads = jax.value_and_grad(score, has_aux=True)(list(features))
    per_head = []
    for g in grads:
        g = g.astype(jnp.float32)
        per_head.append(0.5 * gamma * jnp.mean(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))))
    return combine_heads(per_head, heads), logits, aux


def discriminator_accuracy(real_logits: Logits, fake_logits: Logits) -> dict[str, jax.Array]:
    """For metrics: the fraction of real logits > 0 and of fake logits < 0, over every logit of every
    head and example together (a logit of exactly 0 counts as wrong for both)."""
    flat = lambda logits: jnp.concatenate([x.astype(jnp.float32).reshape(-1) for x in logits])
    real, fake = flat(real_logits), flat(fake_logits)
    return {"real": jnp.mean(real > 0), "fake": jnp.mean(fake < 0)}
