"""Logical-axis annotations: a closed vocabulary, a rule for every name, big weights sharded.

The checks on a mesh run in one child process, so that the 8 fake CPU devices (XLA_FLAGS) exist before
JAX starts.
"""

import textwrap

import flax.linen as nn
import pytest

from sdxl_jax.sharding import ACTIVATION_AXES, ACTIVATION_OF, FSDP_RULES, LOGICAL_AXES
from tests.helpers.processes import run_parts

SCRIPT = textwrap.dedent(
    """
    import math
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from jax.sharding import AxisType
    from sdxl_jax.models import UNet, UNetConfig
    from sdxl_jax.models.unet import abstract_params
    from sdxl_jax.sharding import FSDP_RULES, LOGICAL_AXES, logical_names_in, param_shardings

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)

    # Full SDXL base, abstractly: names, rules, and where the bytes go.
    boxed = abstract_params(UNetConfig.sdxl_base())
    names = logical_names_in(boxed)
    assert names <= set(LOGICAL_AXES), names - set(LOGICAL_AXES)
    shardings = param_shardings(boxed, mesh, FSDP_RULES)  # raises on a name without a rule
    leaves = jax.tree.leaves(nn.meta.unbox(boxed))
    shards = jax.tree.leaves(shardings)
    total = sum(math.prod(p.shape) * 4 for p in leaves)
    per_device = sum(math.prod(s.shard_shape(p.shape)) * 4 for p, s in zip(leaves, shards))
    replicated = sum(math.prod(p.shape) * 4 for p, s in zip(leaves, shards) if s.is_fully_replicated)
    largest = sorted(zip(leaves, shards), key=lambda ps: -math.prod(ps[0].shape))[:50]
    unsharded_big = [p.shape for p, s in largest if math.prod(s.shard_shape(p.shape)) * 8 != math.prod(p.shape)]
    assert not unsharded_big, unsharded_big
    print(f"base: {total / 2**30:.2f} GiB, per device {per_device / 2**30:.3f} GiB, "
          f"replicated {replicated / 2**20:.2f} MiB")
    assert replicated < 0.002 * total, replicated  # only norms and a few small vectors stay whole
    assert per_device < 1.01 * total / 8

    # Tiny UNet: the state is created already sharded (eval_shape -> shardings -> jit(init)).
    # (Shallow, to keep XLA's compile of the random init short on a 2-core CPU.)
    cfg = UNetConfig.tiny(scan_layers=True, channel_mult=(1, 2), transformer_depth=(0, 3), transformer_depth_middle=3)
    args = (jnp.zeros((1, 2, 2, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.context_dim)),
            jnp.zeros((1, cfg.adm_in_channels)))
    init = lambda key: UNet(cfg).init(key, *args)["params"]
    tiny_shardings = param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, FSDP_RULES)
    params = jax.jit(init, out_shardings=tiny_shardings)(jax.random.key(0))
    kernel = params["mid_block"]["attentions_0"]["transformer_blocks"]["attn1"]["to_q"]["kernel"]
    assert kernel.names == ("layers", "embed", "heads"), kernel.names
    assert kernel.value.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), kernel.value.sharding
    assert kernel.value.addressable_shards[0].data.shape == (3, 8, 64)
    """
)


# A spatial transformer (GroupNorm, proj_in, self/cross-attention, GEGLU, proj_out, residual) traced
# with the activation constraints on the (data, fsdp, tensor) = (2, 2, 2) mesh: its output and
# gradients must be those of one device. Constraining only the block boundary, XLA's partitioner
# laid out the tensor-parallel matmuls itself and mixed up batch shards (max error ~4).
CONSTRAINED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from jax.sharding import AxisType, NamedSharding, PartitionSpec
    from sdxl_jax.sharding import sharding_context
    from sdxl_jax.models.attention import SpatialTransformer
    from sdxl_jax.sharding import FSDP_RULES, param_shardings

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    block = SpatialTransformer(1, 2, 32, 8, 1e-6, 1e-5, "xla", "none", False, jnp.float32, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4)
    x, ctx = jax.random.normal(keys[0], (8, 2, 2, 64)), jax.random.normal(keys[1], (8, 77, 48))
    probe = jax.random.normal(keys[2], x.shape)
    params = nn.meta.unbox(block.init(keys[3], x, ctx)["params"])

    def loss(params, x, ctx):
        return jnp.sum(block.apply({"params": params}, x, ctx) * probe)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
    want = jax.jit(fn)(params, x, ctx)
    shardings = param_shardings(jax.eval_shape(block.init, keys[3], x, ctx)["params"], mesh, FSDP_RULES)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    args = (jax.device_put(params, shardings), jax.device_put(x, batch), jax.device_put(ctx, batch))
    with sharding_context(mesh, FSDP_RULES):
        got = jax.jit(fn)(*args)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        scale = float(jnp.max(jnp.abs(w))) + 1e-3
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    """
)


def test_rules_use_only_known_names():
    names = [name for name, _ in FSDP_RULES]
    assert len(names) == len(set(names))  # one rule per name
    assert set(names) == set(LOGICAL_AXES) | set(ACTIVATION_AXES)
    assert set(ACTIVATION_OF.values()) <= set(ACTIVATION_AXES)


# Every activation spec the models constrain: block boundaries and each Dense's input and output.
ACTIVATION_SPECS = [("act_batch", "act_height", "act_width", "act_channels"), ("act_batch", "act_length", "act_embed")]
ACTIVATION_SPECS += [("act_batch", "act_length", a) for a in ACTIVATION_OF.values()]
ACTIVATION_SPECS += [("act_batch", a) for a in ACTIVATION_OF.values()]
WANT = {"act_batch": ("data", "fsdp"), "act_heads": "tensor", "act_mlp": "tensor"}  # everything else: None


@pytest.mark.parametrize("spec", ACTIVATION_SPECS)
def test_activation_layouts_do_not_depend_on_rule_order(spec):
    """Activations have names of their own, so flax's first-come assignment of mesh axes (a later
    dimension skips an axis an earlier rule gave away) cannot change their layout."""
    want = tuple(WANT.get(name) for name in spec)
    assert tuple(nn.logical_to_mesh_axes(spec, FSDP_RULES)) == want
    assert tuple(nn.logical_to_mesh_axes(spec, tuple(reversed(FSDP_RULES)))) == want


@pytest.mark.slow  # test budget: the full base's abstract state on 8 devices (~40 s)
def test_full_base_unet_fsdp_on_8_fake_devices():
    part = run_parts({"fsdp": SCRIPT}, devices=8)["fsdp"]
    assert part["status"] == "ok", part["stdout"] + part["status"]
    print(part["stdout"])


def test_constrained_transformer_on_a_2x2x2_mesh_matches_one_device():
    part = run_parts({"constrained": CONSTRAINED_SCRIPT}, devices=8)["constrained"]
    assert part["status"] == "ok", part["stdout"] + part["status"]


def test_a_rule_list_with_the_old_activation_names_is_refused_by_name():
    from sdxl_jax.sharding import check_rules

    with pytest.raises(ValueError, match="'batch': activations are named 'act_batch'"):
        check_rules((("batch", ("data", "fsdp")),) + FSDP_RULES)
    with pytest.raises(ValueError, match="unknown logical axis 'heigth'"):
        check_rules((("heigth", None),))
