"""SDXL conditioning equals diffusers': prompts -> (context, pooled) as `StableDiffusionXLPipeline.encode_prompt`
computes them, and our `y` drives our UNet exactly as diffusers' `added_cond_kwargs` (text_embeds +
time_ids) drives its UNet (CPU, fp32, tiny random models, weights copied across)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import StableDiffusionXLPipeline

from sdxl_jax import conditioning
from sdxl_jax.convert import (
    text_encoder_config_from_transformers,
    text_encoder_params_from_transformers,
    unet_config_from_diffusers,
    unet_params_from_diffusers,
)
from sdxl_jax.models import UNet
from sdxl_jax.tokenizer import ASSETS_DIR
from tests.helpers.tiny_pipeline import text_encoder
from tests.helpers.torch_reference import assert_parity, state_dict_numpy
from tests.helpers.unet_reference import (
    REFINER_TINY,
    SDXL_TINY,
    TIME_ID_DIM,
    make_reference,
    reference_forward,
)


def close(ours, expected):
    """Equal up to float32 rounding (the jitted sinusoid fuses differently from the eager one)."""
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed, 8k"]


# ---- y: our assembly through our UNet == diffusers' text_time path ------------------------------------


@pytest.mark.parametrize("layout", ["base", pytest.param("refiner", marks=pytest.mark.slow)])  # test budget
def test_y_drives_the_unet_like_diffusers_added_cond_kwargs(layout):
    ref_model = make_reference(SDXL_TINY if layout == "base" else REFINER_TINY, seed=3)
    cfg = unet_config_from_diffusers(dict(ref_model.config))
    params = unet_params_from_diffusers(state_dict_numpy(ref_model), cfg)
    rng = np.random.default_rng(3)
    batch = 2
    x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    t = np.array([900.0, 35.0], np.float32)
    ctx = rng.standard_normal((batch, 5, cfg.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((batch, 16)).astype(np.float32)
    original, crop = np.array([[768, 1344], [1024, 1024]]), np.array([[64, 0], [0, 32]])
    if layout == "base":
        time_ids = conditioning.base_time_ids(original, crop, (1024, 960), batch)
        expected_ids = np.concatenate([original, crop, [[1024, 960]] * batch], axis=1)
    else:
        time_ids = conditioning.refiner_time_ids(original, crop, np.array([6.0, 2.5]), batch)
        expected_ids = np.concatenate([original, crop, [[6.0], [2.5]]], axis=1)
    np.testing.assert_array_equal(time_ids, expected_ids)  # diffusers' add_time_ids order

    y = conditioning.vector_conditioning(pooled, time_ids, dim=TIME_ID_DIM)
    assert y.shape == (batch, cfg.adm_in_channels)
    ours = np.asarray(UNet(cfg).apply({"params": params}, x, t, ctx, y))
    ref = reference_forward(ref_model, x, t, ctx, pooled, np.asarray(expected_ids, np.float32))
    assert_parity(ours, ref)


def test_full_size_y_widths():
    pooled = jnp.zeros((3, conditioning.POOLED_DIM))
    base = conditioning.base_time_ids((1024, 1024), (0, 0), (1024, 1024), 3)
    refiner = conditioning.refiner_time_ids((1024, 1024), (0, 0), 6.0, 3)
    assert conditioning.vector_conditioning(pooled, base).shape == (3, 2816)
    assert conditioning.vector_conditioning(pooled, refiner).shape == (3, 2560)


def test_micro_conditioning_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected \(h, w\) or \[2, 2\]"):
        conditioning.base_time_ids((1024, 1024, 3), (0, 0), (1024, 1024), 2)
    with pytest.raises(ValueError, match=r"expected a scalar or \[2\]"):
        conditioning.refiner_time_ids((1024, 1024), (0, 0), [6.0, 2.5, 1.0], 2)


def test_drop_text_zeroes_only_the_marked_examples():
    context, pooled = jnp.ones((3, 4, 5)), jnp.ones((3, 6))
    c, p = conditioning.drop_text(context, pooled, jnp.array([False, True, False]))
    np.testing.assert_array_equal(np.asarray(c).sum(axis=(1, 2)), [20, 0, 20])
    np.testing.assert_array_equal(np.asarray(p).sum(axis=1), [6, 0, 6])


# ---- prompts -> context, pooled: ours == diffusers' encode_prompt --------------------------------------


def to_flax(model):
    cfg = text_encoder_config_from_transformers(model.config.to_dict())
    return cfg, text_encoder_params_from_transformers(state_dict_numpy(model), cfg)


@pytest.fixture(scope="module")
def encoders():
    """Tiny CLIP-L-like (quick_gelu, no projection) and bigG-like (gelu, projection) encoders, both sides."""
    te_l = text_encoder(transformers.CLIPTextModel, "quick_gelu", seed=1, hidden_size=32)
    te_g = text_encoder(transformers.CLIPTextModelWithProjection, "gelu", seed=2, hidden_size=32)
    vocab, merges = str(ASSETS_DIR / "vocab.json"), str(ASSETS_DIR / "merges.txt")
    pipe = StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None, text_encoder=te_l, text_encoder_2=te_g,
        tokenizer=transformers.CLIPTokenizer(vocab, merges, model_max_length=77),
        tokenizer_2=transformers.CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77),
    )  # fmt: skip
    (cfg_l, params_l), (cfg_g, params_g) = to_flax(te_l), to_flax(te_g)
    return pipe, conditioning.TextEncoders(cfg_g=cfg_g, params_g=params_g, cfg_l=cfg_l, params_l=params_l)


def reference_encode(pipe, prompts, negative, text_encoders="both"):
    if text_encoders == "g":  # the refiner pipeline's layout: bigG only
        pipe = StableDiffusionXLPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None})
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
    with torch.no_grad():
        out = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative)
    return [o.numpy() for o in out]  # context, negative context, pooled, negative pooled


@pytest.mark.parametrize("negative", [None, ["blurry, low quality", "ugly"]], ids=["no-negative", "negative"])
def test_base_prompt_encoding_matches_diffusers(encoders, negative):
    pipe, ours = encoders
    ctx, neg_ctx, pooled, neg_pooled = reference_encode(pipe, PROMPTS, negative)
    cond, uncond = conditioning.encode_prompt(ours, PROMPTS, negative, height=1024, width=768)
    assert cond.context.shape == (2, 77, 64) and cond.y.shape == (2, 24 + 6 * 256)
    np.testing.assert_allclose(cond.context, ctx, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cond.y[:, :24], pooled, rtol=0, atol=1e-5)
    np.testing.assert_allclose(uncond.context, neg_ctx, rtol=0, atol=1e-5)
    np.testing.assert_allclose(uncond.y[:, :24], neg_pooled, rtol=0, atol=1e-5)
    if negative is None:  # the base's empty negative prompt is exactly zeros
        assert not np.any(np.asarray(uncond.context)) and not np.any(np.asarray(uncond.y[:, :24]))
    else:
        assert np.abs(neg_ctx).max() > 0.1
    assert np.abs(ctx).max() > 0.1
    # micro-conditioning: (1024, 768) everywhere, crop (0, 0), copied into the unconditional branch
    expected = conditioning.embed_scalars(np.array([[1024, 768, 0, 0, 1024, 768]] * 2))
    close(cond.y[:, 24:], expected)
    close(uncond.y[:, 24:], expected)


def test_refiner_encodes_the_empty_negative_prompt(encoders):
    pipe, both = encoders
    ours = conditioning.TextEncoders(cfg_g=both.cfg_g, params_g=both.params_g)
    ctx, neg_ctx, pooled, neg_pooled = reference_encode(pipe, PROMPTS, None, text_encoders="g")
    cond, uncond = conditioning.encode_prompt(ours, PROMPTS, None, aesthetic_score=6.0, negative_aesthetic_score=2.5)
    assert cond.context.shape == (2, 77, 32) and cond.y.shape == (2, 24 + 5 * 256)
    for a, b in (
        (cond.context, ctx),
        (cond.y[:, :24], pooled),
        (uncond.context, neg_ctx),
        (uncond.y[:, :24], neg_pooled),
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.abs(neg_ctx).max() > 0.1  # encoded "", not zeros
    close(cond.y[:, 24:], conditioning.embed_scalars(np.array([[1024, 1024, 0, 0, 6.0]] * 2)))
    close(uncond.y[:, 24:], conditioning.embed_scalars(np.array([[1024, 1024, 0, 0, 2.5]] * 2)))


def test_chunked_prompts_concatenate_chunk_states(encoders):
    _, ours = encoders
    long = " ".join(["red"] * 100)  # 100 tokens: two chunks
    cond, uncond = conditioning.encode_prompt(ours, [long, "a cat"], None, mode="chunked")
    assert cond.context.shape == (2, 154, 64) and uncond.context.shape == (2, 154, 64)
    truncated, _ = conditioning.encode_prompt(ours, [long, "a cat"], None)
    np.testing.assert_allclose(
        cond.context[:, :77], truncated.context, rtol=0, atol=1e-6
    )  # first chunk = truncated row
    np.testing.assert_allclose(cond.y, truncated.y, rtol=0, atol=1e-6)  # pooled from the first chunk
