"""ATTENTION_IMPLS['flash'] (the Pallas splash kernel, in interpret mode on CPU) against 'xla': outputs and
q/k/v gradients at SDXL-like structure (self-attention, 77 text-token keys, CLIP's causal 77 tokens, one
wide head over a ragged length), the shard_map path on 8 fake devices, a tiny UNet, and a deviceless
v5e compile that must contain the Mosaic kernel rather than an interpreted loop.

Errors are max|flash - xla| / max|xla| over each whole array, fp32, at most 1e-5."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from sdxl_jax.models.attention import ATTENTION_IMPLS
from sdxl_jax.models.flash_attention import activation_spec, block_size, splash_attention
from sdxl_jax.models.unet import UNet, UNetConfig
from sdxl_jax.sharding import FSDP_RULES, MESH_AXES
from tests.helpers.processes import run_parts

TOLERANCE = 1e-5


def max_relative_error(got, want) -> float:
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def out_and_grads(attention, q, k, v, cotangent, causal: bool):
    """(attention output, d/dq, d/dk, d/dv of <output, cotangent>) under one jit."""

    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal), q, k, v)
        return out, *vjp(cotangent)

    return jax.jit(run)(q, k, v)


# name -> (B, T, S, N, H, causal)
CASES = {
    "self_attention": (1, 384, 384, 2, 64, False),  # 3 x 3 blocks of 128: the running softmax across kv blocks
    "cross_attention_77_keys": (2, 256, 77, 2, 64, False),  # keys padded to 128, masked by segment id
    "clip_causal_77": (2, 77, 77, 2, 64, True),  # queries and keys padded
    "one_wide_head_ragged": (1, 200, 200, 1, 128, False),  # the VAE mid-block's shape of problem
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_and_gradients_match_xla(case):
    b, t, s, n, h, causal = CASES[case]
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q, cotangent = jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kc, (b, t, n, h))
    k, v = jax.random.normal(kk, (b, s, n, h)), jax.random.normal(kv, (b, s, n, h))
    # the kernel itself: `flash` sends fewer than 128 keys to XLA, so short cases would not reach it
    got = out_and_grads(splash_attention, q, k, v, cotangent, causal)
    want = out_and_grads(ATTENTION_IMPLS["xla"], q, k, v, cotangent, causal)
    errors = {name: max_relative_error(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    print(case, errors)
    assert all(e <= TOLERANCE for e in errors.values()), errors


def test_short_keys_take_the_xla_path():
    """`flash` with fewer than 128 keys (text cross-attention, CLIP) is XLA's attention, bit for bit."""
    q, k = jax.random.normal(jax.random.key(1), (2, 256, 2, 64)), jax.random.normal(jax.random.key(2), (2, 77, 2, 64))
    for causal, queries in ((False, q), (True, q[:, :77])):
        got = ATTENTION_IMPLS["flash"](queries, k, k, causal)
        assert jnp.array_equal(got, ATTENTION_IMPLS["xla"](queries, k, k, causal))


def test_block_sizes():
    assert [block_size(n) for n in (4096, 1024, 16384, 512, 256, 128, 384, 640)] == [512] * 4 + [256, 128, 128, 128]


def test_kernel_shards_follow_the_logical_rules():
    mesh, data_only = AbstractMesh((2, 2, 2), MESH_AXES), AbstractMesh((4,), ("data",))
    with nn.logical_axis_rules(FSDP_RULES):
        assert activation_spec((4, 256, 2, 64), mesh) == P(("data", "fsdp"), None, "tensor", None)
        assert activation_spec((2, 256, 3, 64), mesh) == P("data", None, None, None)  # fsdp, tensor: no
        assert activation_spec((1, 77, 2, 64), mesh) == P(None, None, "tensor", None)
        assert activation_spec((4, 256, 2, 64), data_only) == P("data", None, None, None)
    assert activation_spec((4, 256, 2, 64), mesh) == P(None, None, None, None)  # no rules in context


SHARDED = """
import json
import flax.linen as nn, jax, jax.numpy as jnp
from jax.sharding import AxisType
from sdxl_jax.models.flash_attention import splash_attention
from sdxl_jax.sharding import FSDP_RULES, MESH_AXES

mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
result = {}
for batch in (4, 2):  # batch over data x fsdp; over data alone (data x fsdp does not divide 2)
    kq, kk, kv, kc = jax.random.split(jax.random.key(batch), 4)
    q, cotangent = jax.random.normal(kq, (batch, 256, 2, 64)), jax.random.normal(kc, (batch, 256, 2, 64))
    k, v = jax.random.normal(kk, (batch, 77, 2, 64)), jax.random.normal(kv, (batch, 77, 2, 64))

    def out_and_grads(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: splash_attention(q, k, v, False), q, k, v)
        return out, *vjp(cotangent)

    want = jax.jit(out_and_grads)(q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(FSDP_RULES):
        traced = str(jax.make_jaxpr(out_and_grads)(q, k, v))
        got = jax.jit(out_and_grads)(q, k, v)
    result[batch] = {
        "shard_maps": traced.count("shard_map["),
        "spec": [list(axes) if isinstance(axes, tuple) else axes for axes in got[0].sharding.spec],
        "errors": [float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want)],
    }
print(json.dumps(result))
"""


def test_sharded_kernel_matches_unsharded():
    result = json.loads(run_parts({"sharded": SHARDED}, devices=8)["sharded"]["stdout"])
    print(result)
    assert result["4"]["spec"] == [["data", "fsdp"], None, "tensor"]
    assert result["2"]["spec"] == ["data", None, "tensor"]
    for batch in ("4", "2"):
        assert result[batch]["shard_maps"] == 2  # forward and its transpose
        assert max(result[batch]["errors"]) <= TOLERANCE, result[batch]


def test_tiny_unet_with_flash_matches_xla():
    cfg = UNetConfig.tiny(channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1)
    keys = jax.random.split(jax.random.key(0), 3)
    x, t = jax.random.normal(keys[0], (2, 16, 16, 4)), jnp.array([10.0, 500.0])  # 8x8 = 64 tokens at level 1
    context, y = jax.random.normal(keys[1], (2, 77, cfg.context_dim)), jax.random.normal(keys[2], (2, 40))
    # random weights from the abstract tree (init's own compile would cost more than the test)
    leaves, tree = jax.tree.flatten(nn.meta.unbox(jax.eval_shape(UNet(cfg).init, keys[0], x, t, context, y)))
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [0.1 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])
    apply = lambda impl: jax.jit(UNet(cfg.replace(attention=impl)).apply)(params, x, t, context, y)
    error = max_relative_error(apply("flash"), apply("xla"))
    print(f"tiny UNet: flash vs xla {error:.2e}")
    assert error <= TOLERANCE


TPU_COMPILE = """
import json
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from sdxl_jax.models.attention import ATTENTION_IMPLS
from sdxl_jax.sharding import FSDP_RULES, MESH_AXES

devices = np.array(topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices)
flash = lambda q, k, v: ATTENTION_IMPLS["flash"](q, k, v, False)

def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(flash, q, k, v)
    return vjp(out)

def compiled(fn, mesh_shape, q_shape, kv_shape):
    mesh = Mesh(devices.ravel()[: np.prod(mesh_shape)].reshape(mesh_shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    arg = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    with jax.set_mesh(mesh), nn.logical_axis_rules(FSDP_RULES):
        text = jax.jit(fn).lower(arg(q_shape), arg(kv_shape), arg(kv_shape)).compile().as_text()
    return {"kernels": text.count('custom_call_target="tpu_custom_call"'), "loops": text.count(" while(")}

print(json.dumps({
    "self": compiled(flash, (1, 1, 1), (1, 4096, 10, 64), (1, 4096, 10, 64)),
    "cross_77": compiled(flash, (1, 1, 1), (1, 4096, 10, 64), (1, 77, 10, 64)),
    "self_fwd_bwd": compiled(fwd_bwd, (1, 1, 1), (1, 4096, 10, 64), (1, 4096, 10, 64)),
    "sharded_4_chips": compiled(flash, (2, 1, 2), (2, 4096, 10, 64), (2, 4096, 10, 64)),
}))
"""


def test_deviceless_tpu_compile_runs_the_mosaic_kernel(monkeypatch):
    """The host's devices are CPUs; the program compiled for a v5e must still hold the compiled kernel
    (one custom call forward, three with the backward) and no interpret-mode loop; 77 keys go to XLA."""
    pytest.importorskip("libtpu")
    # Deviceless compiles only: another process on this host may hold libtpu's lock (it does no harm).
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    result = json.loads(run_parts({"tpu": TPU_COMPILE})["tpu"]["stdout"])
    print(result)
    assert result == {
        "self": {"kernels": 1, "loops": 0},
        "cross_77": {"kernels": 0, "loops": 0},  # 77 keys: XLA's attention
        "self_fwd_bwd": {"kernels": 3, "loops": 0},
        "sharded_4_chips": {"kernels": 1, "loops": 0},
    }
