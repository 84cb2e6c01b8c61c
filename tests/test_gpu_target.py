"""The gpu:h100:N target: XLA's GPU compiler run for eight H100s with no GPU present. The compiles need
the CUDA plugin (`jax[cuda12]`) and skip without it; the error that names the install never does."""

import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdxl_jax.models.attention import dot_product_attention
from sdxl_jax.train.hlo_traffic import memory_traffic
from sdxl_jax.train.targets import parse_target


def test_missing_plugin_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_plugins.xla_cuda12", None)  # its import now fails
    with pytest.raises(RuntimeError, match=r'gpu:h100:8 needs the CUDA plugin.*pip install "jax\[cuda12\]=='):
        parse_target("gpu:h100:8").devices()


@pytest.fixture(scope="module")
def mesh():
    pytest.importorskip("jax_plugins.xla_cuda12")
    return Mesh(parse_target("gpu:h100:8").devices(), ("data",))


def test_eight_h100s_compile_a_sharded_matmul(mesh):
    assert [d.device_kind for d in mesh.devices.flat] == ["NVIDIA H100 80GB HBM3"] * 8
    x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))
    w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(lambda x, w: jax.nn.gelu(x @ w)).lower(x, w).compile()
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes == (128 * 512 + 512 * 256) * 2  # a device's 128 rows of x, all of w
    assert mem.output_size_in_bytes == 128 * 256 * 2
    assert "num_partitions=8" in compiled.as_text() and "__triton" in compiled.as_text()  # a GPU program


def test_cudnn_attention_compiles_to_fused_kernels(mesh):
    """Forward and backward are one cuDNN flash-attention call each, so the traffic is q, k, v and the
    output (and its gradients), never the [B, N, T, S] scores."""
    qkv = jax.ShapeDtypeStruct((8, 256, 4, 64), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))
    attention = lambda q, k, v: dot_product_attention(q, k, v, implementation="cudnn")
    forward = jax.jit(attention).lower(qkv, qkv, qkv).compile().as_text()
    assert forward.count('custom_call_target="__cudnn$fmhaSoftmax"') == 1
    assert memory_traffic(forward) == 4 * 256 * 4 * 64 * 2  # per device: reads q, k, v, writes the output
    loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32))
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv).compile().as_text()
    assert 'custom_call_target="__cudnn$fmhaSoftmaxBackward"' in backward
