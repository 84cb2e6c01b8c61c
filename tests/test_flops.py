"""Model FLOPs from the jaxpr: closed forms for each counted op, scans times their length, and a UNet's
count independent of `scan_layers` and close to XLA's own count of the unscanned program."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.models import UNet, UNetConfig
from sdxl_jax.models.unet import abstract_params
from sdxl_jax.train.flops import jaxpr_flops


def flops_of(fn, *args) -> float:
    return jaxpr_flops(jax.jit(fn).trace(*args).jaxpr)


def test_matmul_and_batched_matmul():
    a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
    assert flops_of(lambda a, b: a @ b, a, b) == 2 * 64 * 128 * 32
    q, k = jnp.ones((2, 4, 10, 16)), jnp.ones((2, 4, 12, 16))  # attention scores: batch, heads, queries, keys
    assert flops_of(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k), q, k) == 2 * 2 * 4 * 10 * 12 * 16


def test_convolution_with_groups_and_its_gradient():
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 4, 6))  # 2 groups of 4 input channels

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
        )

    forward = 2 * (2 * 16 * 16 * 6) * (4 * 3 * 3)
    assert flops_of(conv, x, w) == forward
    grads = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
    assert flops_of(grads, x, w) == 3 * forward  # forward, input gradient, weight gradient


def test_scans_count_every_iteration_and_conds_their_costlier_branch():
    def layers(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

    x, ws = jnp.ones((8, 32)), jnp.ones((10, 32, 32))
    assert flops_of(layers, x, ws) == 10 * 2 * 8 * 32 * 32
    assert jax.jit(layers).lower(x, ws).cost_analysis()["flops"] < 2 * 2 * 8 * 32 * 32  # what XLA counts: once

    def branchy(p, x, w):
        return jax.lax.cond(p, lambda: x @ w @ w, lambda: x @ w)

    assert flops_of(branchy, True, x, ws[0]) == 2 * 2 * 8 * 32 * 32


@pytest.mark.slow  # test budget (~15 s); the step's count is tested by default below
def test_unet_count_does_not_depend_on_scanned_layers_and_matches_xla():
    cfg = UNetConfig.tiny()
    batch, latent = 2, (16, 16)
    counts = {}
    for scan in (False, True):
        c = cfg.replace(scan_layers=scan)
        params = nn.meta.unbox(abstract_params(c, batch, latent))
        args = (
            jax.ShapeDtypeStruct((batch, *latent, c.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((batch, 7, c.context_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, c.adm_in_channels), jnp.float32),
        )

        def loss(p, x, t, ctx, y, c=c):
            return jnp.sum(UNet(c).apply({"params": p}, x, t, ctx, y) ** 2)

        traced = jax.jit(jax.grad(loss)).trace(params, *args)
        counts[scan] = jaxpr_flops(traced.jaxpr)
        if not scan:  # XLA sees every layer of the unrolled program; it adds the elementwise work and
            xla = traced.lower().cost_analysis()["flops"]  # leaves out the zero padding at conv borders
            assert 0.85 * xla < counts[scan] < 1.15 * xla, (counts[scan], xla)
    np.testing.assert_allclose(counts[True], counts[False], rtol=1e-12)


def test_model_flops_of_the_train_step_leave_out_remat():
    """The step's model FLOPs are those of the same step without remat; the rematerialised program's own
    jaxpr repeats forward passes (more FLOPs) that MFU must not count."""
    from configs import tiny
    from sdxl_jax.train.memory_plan import abstract_step
    from sdxl_jax.train.step import make_train_step, model_flops

    counts = {}
    for remat in ("none", "full"):
        config = tiny.get_config()
        config.model.unet.remat = remat
        spec, inputs = abstract_step(config, {"data": 1, "fsdp": 1, "tensor": 1}, 2, 32, 32, False)
        counts[remat] = model_flops(spec, *inputs)
        if remat == "full":
            repeated = jaxpr_flops(make_train_step(spec).trace(*inputs).jaxpr)
    assert counts["full"] == counts["none"]
    assert repeated > 1.1 * counts["none"]  # full remat runs the UNet forward twice
