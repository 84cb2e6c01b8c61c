"""The generation pipeline end to end against diffusers' SDXL pipelines (CPU, fp32, tiny random SDXL
pipelines saved with `save_pretrained` and loaded through our converter, the same initial latents).

Tolerances: our program and diffusers' differ only in float rounding (XLA vs oneDNN kernels, fused vs
unfused attention), which a few sampler steps carry to ~1e-5 relative in the latents; decoded uint8
images may then differ by one level where a value sits at a rounding boundary.
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from sdxl_jax.pipeline import NonFiniteImageWarning, Pipeline, encode_images
from sdxl_jax.sampling import SamplingOptions
from tests.helpers import tiny_pipeline

H, W = 64, 96  # latent 8 x 12: non-square, so a swapped height/width cannot pass
# No "!": diffusers' bigG tokenizer has "!" as its pad token, a special token, so it turns a "!" in the
# prompt into id 0 instead of open_clip's (and sgm's, and our) 256. That quirk is diffusers', not SDXL's.
PROMPTS = ["a photo of a cat", "An astronaut riding a horse, 4k, highly detailed."]
LATENT_RTOL = 1e-4  # relative to the latents' largest magnitude


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def diffusers_uint8(images):
    return (images * 255).round().astype(np.uint8)  # what diffusers' numpy_to_pil does


def assert_latents_close(ours, theirs):
    scale = np.abs(theirs).max()
    assert scale > 0.05, "degenerate latents prove nothing"
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=LATENT_RTOL * scale)


def assert_images_close(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    assert theirs.std() > 5, "flat images prove nothing"
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def torch_pipes():
    base = tiny_pipeline.base_pipeline()
    # The real refiner ships the base's VAE; decode both stages with one VAE so images compare.
    refiner = StableDiffusionXLImg2ImgPipeline(
        **{**tiny_pipeline.refiner_pipeline().components, "vae": base.vae},
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    return base, refiner


@pytest.fixture(scope="module")
def ours(torch_pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    base, refiner = torch_pipes
    base.save_pretrained(root / "base")
    refiner.save_pretrained(root / "refiner")
    return Pipeline.load(root / "base", refiner=root / "refiner", dtype="fp32")


def initial_noise(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, H // 8, W // 8, 4)).astype(np.float32)


# (An empty negative prompt differs by design: sgm, and we, zero its text as for None; diffusers encodes "".)
@pytest.mark.parametrize("negative", [None, ["blurry, low quality", "cartoon"]])
def test_base_euler_matches_diffusers(torch_pipes, ours, negative):
    """Euler, leading spacing, CFG 5: latents and decoded images equal StableDiffusionXLPipeline's."""
    base, _ = torch_pipes
    noise = initial_noise(len(PROMPTS))
    kw = dict(prompt=PROMPTS, negative_prompt=negative, height=H, width=W, num_inference_steps=6, guidance_scale=5.0)
    with torch.no_grad():
        want_latents = nhwc(base(**kw, latents=nchw(noise), output_type="latent").images)
        want_images = diffusers_uint8(base(**kw, latents=nchw(noise), output_type="np").images)
    images, latents = ours.generate(
        PROMPTS, negative, height=H, width=W, steps=6, guidance_scale=5.0, latents=noise, return_latents=True
    )
    assert_latents_close(latents, want_latents)
    assert_images_close(images, want_images)


def test_handoff_matches_diffusers_denoising_end_start(torch_pipes, ours):
    """Base to 0.8 of the schedule, the refiner from there without new noise: diffusers' pair of calls."""
    base, refiner = torch_pipes
    noise = initial_noise(len(PROMPTS), seed=1)
    common = dict(prompt=PROMPTS, num_inference_steps=10, guidance_scale=5.0)
    with torch.no_grad():
        handoff = base(**common, height=H, width=W, latents=nchw(noise), denoising_end=0.8, output_type="latent").images
        want_latents = nhwc(refiner(**common, image=handoff, denoising_start=0.8, output_type="latent").images)
        want_images = diffusers_uint8(refiner(**common, image=handoff, denoising_start=0.8, output_type="np").images)
    images, latents = ours.generate(
        PROMPTS, height=H, width=W, steps=10, guidance_scale=5.0, latents=noise, denoising_end=0.8, return_latents=True
    )
    assert_latents_close(latents, want_latents)
    assert_images_close(images, want_images)


def test_refiner_img2img_matches_diffusers(torch_pipes, ours):
    """Base to the end, then the refiner as SDEdit (strength 0.3 of 10 steps): StableDiffusionXLImg2ImgPipeline
    on the base's latents, with the noise its generator draws."""
    base, refiner = torch_pipes
    noise = initial_noise(len(PROMPTS), seed=2)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        clean = base(
            prompt=PROMPTS, height=H, width=W, num_inference_steps=6, latents=nchw(noise), output_type="latent"
        ).images
        refiner_noise = nhwc(torch.randn(clean.shape, generator=torch.Generator().manual_seed(7)))
        want = refiner(
            prompt=PROMPTS, image=clean, strength=0.3, num_inference_steps=10, generator=generator, output_type="latent"
        ).images
    _, latents = ours.generate(
        PROMPTS,
        height=H,
        width=W,
        steps=6,
        latents=noise,
        refiner_strength=0.3,
        refiner_steps=10,
        refiner_noise=refiner_noise,
        return_latents=True,
    )
    assert_latents_close(latents, nhwc(want))


def test_img2img_from_latents_matches_diffusers(torch_pipes, ours):
    """Plain image-to-image with the base (strength 0.6), the init image given as latents as diffusers allows."""
    base, _ = torch_pipes
    img2img = StableDiffusionXLImg2ImgPipeline(**base.components)
    img2img.set_progress_bar_config(disable=True)
    init = initial_noise(len(PROMPTS), seed=3)
    with torch.no_grad():
        noise = nhwc(torch.randn((len(PROMPTS), 4, H // 8, W // 8), generator=torch.Generator().manual_seed(5)))
        want = img2img(
            prompt=PROMPTS,
            image=nchw(init),
            strength=0.6,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(5),
            output_type="latent",
        ).images
    _, latents = ours.generate(
        PROMPTS, height=H, width=W, steps=10, image=init, strength=0.6, latents=noise, return_latents=True
    )
    assert_latents_close(latents, nhwc(want))
    # uint8 images are encoded (posterior mean) and then take the same path
    pixels = np.random.default_rng(4).integers(0, 256, (len(PROMPTS), H, W, 3), dtype=np.uint8)
    _, from_pixels = ours.generate(
        PROMPTS, height=H, width=W, steps=10, image=pixels, strength=0.6, latents=noise, return_latents=True
    )
    _, from_latents = ours.generate(
        PROMPTS,
        height=H,
        width=W,
        steps=10,
        strength=0.6,
        latents=noise,
        return_latents=True,
        image=encode_images(ours.models.vae_cfg, ours.models.vae_params, pixels),
    )
    np.testing.assert_array_equal(from_pixels, from_latents)


def test_new_prompts_seeds_guidance_do_not_recompile(ours, caplog):
    """One compilation of the program across calls that change prompts, seeds, guidance and micro-conditioning."""
    import jax

    kw = dict(height=H, width=W, steps=3, sampler="euler_a")
    with jax.log_compiles(), caplog.at_level(logging.INFO):
        ours.generate(["a red cube", "a blue ball"], **kw, seed=0, guidance_scale=5.0)
        ours.generate(["something else entirely", "and more"], ["ugly", "bad"], **kw, seed=123, guidance_scale=9.5)
        ours.generate(["a third", "pair"], **kw, seed=7, guidance_scale=3.0, original_size=(512, 768), crop=(16, 32))
    compiles = [r for r in caplog.records if "Compiling jit(generate)" in r.getMessage()]
    assert len(compiles) == 1
    reports = [r.getMessage() for r in caplog.records if "compiled the generation program" in r.getMessage()]
    assert len(reports) == 1 and "temporaries" in reports[0], reports  # what `sample.py -v 0` shows


@pytest.mark.slow  # test budget: a third sampler's compile (~25 s)
def test_an_image_depends_only_on_its_seed(ours):
    """Image i of a call with seed s equals the single image made with seed s + i (stochastic sampler)."""
    kw = dict(height=H, width=W, steps=4, sampler="euler_a", return_latents=True)
    prompts = ["a cat", "a dog", "a bird"]
    images, latents = ours.generate(prompts, seed=40, **kw)
    one_image, one_latent = ours.generate(prompts[2], seed=42, **kw)
    np.testing.assert_allclose(one_latent[0], latents[2], rtol=0, atol=1e-5 * np.abs(latents).max())
    assert np.abs(one_image[0].astype(int) - images[2]).max() <= 1
    assert not np.allclose(latents[0], latents[1])


def test_options_and_keyword_arguments_are_the_same_call(ours):
    """`options=SamplingOptions(...)` and the same fields as keyword arguments give the same images; keyword
    arguments replace the options' fields. (The program of the recompilation test: nothing compiles.)"""
    kw = dict(height=H, width=W, steps=3, sampler="euler_a", guidance_scale=4.0, original_size=(512, 768))
    options = SamplingOptions(**kw)
    images = ours.generate(PROMPTS, options=options, seed=3)
    assert images.std() > 5
    np.testing.assert_array_equal(images, ours.generate(PROMPTS, seed=3, **kw))
    other = ours.generate(PROMPTS, options=options, seed=3, guidance_scale=7.0)
    np.testing.assert_array_equal(other, ours.generate(PROMPTS, seed=3, **(kw | dict(guidance_scale=7.0))))
    assert not np.array_equal(other, images)


@pytest.mark.parametrize("bad, message", [
    (dict(sampler="euler_b"), "unknown sampler 'euler_b'; valid: euler, euler_a"),
    (dict(schedule="sometimes"), "unknown schedule 'sometimes'; valid: leading"),
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(width=0), "width must be >= 1"),
    (dict(sampler="ddim", schedule="karras"), "DDIM has no Karras variant"),
    (dict(denoising_end=0.8, refiner_strength=0.3), "not both"),
    (dict(prompt_mode="long"), "unknown prompt_mode 'long'"),
])  # fmt: skip
def test_bad_options_are_errors_when_made(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**bad)
    with pytest.raises(ValueError, match=message):
        SamplingOptions().replace(**bad)


def test_options_from_and_to_a_config():
    """A config holds the `CONFIG_FIELDS`, an unset refiner split as 0; other entries are not options."""
    import ml_collections

    options = SamplingOptions(steps=4, sampler="heun", denoising_end=0.8)
    fields = options.config_fields()
    assert fields["refiner_strength"] == 0.0 and fields["denoising_end"] == 0.8 and fields["steps"] == 4
    config = ml_collections.ConfigDict(fields | {"every": 10, "prompts": ("a cat",)})
    assert SamplingOptions.from_config(config) == options
    assert SamplingOptions.from_config(config, denoising_end=None).refiner_mode is None
    assert SamplingOptions.from_config(ml_collections.ConfigDict({"steps": 7})) == SamplingOptions(steps=7)


def test_bad_arguments_raise_clear_errors(ours):
    with pytest.raises(ValueError, match="multiple of 32"):
        ours.generate("a cat", height=72, width=W)
    with pytest.raises(KeyError, match="valid: euler"):
        ours.generate("a cat", height=H, width=W, sampler="euler_b")
    with pytest.raises(ValueError, match="unknown schedule"):
        ours.generate("a cat", height=H, width=W, schedule="sometimes")
    with pytest.raises(ValueError, match="not both"):
        ours.generate("a cat", height=H, width=W, denoising_end=0.8, refiner_strength=0.3)
    with pytest.raises(ValueError, match="latents must be"):
        ours.generate("a cat", height=H, width=W, latents=np.zeros((1, 4, 8, 12), np.float32))


def test_nonfinite_decode_is_reported(ours):
    import dataclasses

    import jax

    bad_vae = jax.tree.map(lambda x: x, ours.models.vae_params)
    bad_vae["decoder"]["conv_out"]["bias"] = bad_vae["decoder"]["conv_out"]["bias"] * np.nan
    broken = dataclasses.replace(ours, models=ours.models.replace(vae_params=bad_vae))
    with pytest.warns(NonFiniteImageWarning, match="decode in fp32"):
        images = broken.generate("a cat", height=H, width=W, steps=2)
    assert (images == 0).all()
