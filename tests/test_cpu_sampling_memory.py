"""What keeps sampling on XLA:CPU within memory: query-chunked attention (exact against 'xla'), the VAE
decoding a batch a group at a time (the same images), and the compiler options that stop XLA:CPU from
holding an fp32 copy of every half-precision weight at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax import generation
from sdxl_jax.models.attention import ATTENTION_IMPLS, chunked_attention
from sdxl_jax.models.vae import AutoencoderKL, VAEConfig


@pytest.mark.parametrize("t,s,causal", [(40, 40, False), (40, 7, False), (16, 16, True)])
def test_chunked_attention_is_xla_attention(t, s, causal):
    """Chunks of 16 queries over a ragged 40 (3 chunks, the last padded), cross-attention keys, and the
    causal / short cases that pass through unchunked; outputs and gradients."""
    q, k, v, ct = (jax.random.normal(jax.random.key(i), shape) for i, shape in
                   enumerate([(2, t, 3, 8), (2, s, 3, 8), (2, s, 3, 8), (2, t, 3, 8)]))  # fmt: skip

    def run(attention):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal), q, k, v)
        return out, *vjp(ct)

    got = jax.jit(lambda: run(lambda *a: chunked_attention(*a, chunk=16)))()
    want = jax.jit(lambda: run(ATTENTION_IMPLS["xla"]))()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # test budget (~20 s)
def test_decoding_in_groups_gives_the_same_images():
    cfg = VAEConfig.tiny()
    params = AutoencoderKL(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    latents = jax.random.normal(jax.random.key(1), (4, 2, 2, cfg.latent_channels)) * 3
    latents = latents.at[2, 0, 0, 0].set(jnp.nan)  # image 2 decodes non-finite; the flag must stay with it
    whole = jax.jit(lambda z: generation.decode(cfg, params, z))(latents)
    for group in (1, 2):
        images, finite = jax.jit(lambda z, g=group: generation.decode(cfg, params, z, g))(latents)
        np.testing.assert_array_equal(images, whole[0])
        np.testing.assert_array_equal(finite, whole[1])
    assert whole[1].tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="does not divide"):
        generation.decode(cfg, params, latents[:3], 2)


def test_cpu_options_stop_fp32_copies_of_every_weight():
    """A loop over 8 bf16 layers: by default XLA:CPU converts all 8 weights to fp32 up front and keeps
    them for the whole loop; compiled with `generation.compiler_options("cpu")` far fewer are alive."""
    weights = [jax.ShapeDtypeStruct((512, 512), jnp.bfloat16)] * 8
    x = jax.ShapeDtypeStruct((4, 512), jnp.bfloat16)

    def program(weights, x):
        def step(x, _):
            for w in weights:
                x = jnp.tanh(x @ w)
            return x, None

        return jax.lax.scan(step, x, None, length=3)[0]

    lowered = jax.jit(program).lower(weights, x)
    default = lowered.compile().memory_analysis().temp_size_in_bytes
    frugal = lowered.compile(generation.compiler_options("cpu")).memory_analysis().temp_size_in_bytes
    all_fp32 = 8 * 512 * 512 * 4
    assert default >= all_fp32  # the failure this guards against: every weight's fp32 copy at once
    assert frugal <= all_fp32 / 2, (frugal, default)
    assert generation.compiler_options("tpu") is None
