"""Pixel space as a first stage: exact patchify round trip, the VAE's interface, saving and loading a
pipeline that has it, and the training objective travelling with an export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.convert.pipeline_weights import config_from_dict, config_to_dict, load_pipeline_weights, save_project
from sdxl_jax.convert.random_init import random_weights, tiny_configs
from sdxl_jax.models import VAEConfig
from sdxl_jax.models.pixel_space import PixelSpace, PixelSpaceConfig, depth_to_space, first_stage, space_to_depth


def test_patchify_is_exact_and_orders_channels_by_position_then_colour():
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    z = space_to_depth(x, 2)
    assert z.shape == (2, 4, 6, 12)
    np.testing.assert_array_equal(depth_to_space(z, 2), x)
    # latent (i, j) channel (dy * 2 + dx) * 3 + c is pixel (2i + dy, 2j + dx) colour c
    np.testing.assert_array_equal(z[1, 3, 5, (1 * 2 + 0) * 3 + 2], x[1, 7, 10, 2])


def test_pixel_space_has_the_autoencoders_interface():
    cfg = PixelSpaceConfig(patch_size=4, scaling_factor=2.0)
    assert (cfg.latent_channels, cfg.downsample_factor) == (48, 4)
    module = first_stage(cfg)
    assert isinstance(module, PixelSpace)
    assert module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3))) == {}  # no parameters
    x = jax.random.uniform(jax.random.key(1), (2, 16, 8, 3), minval=-1, maxval=1)
    dist = module.apply({}, x, method="encode")
    assert dist.mean.shape == (2, 4, 2, 48)
    np.testing.assert_allclose(dist.sample(jax.random.key(2)), dist.mode(), atol=3e-6)  # std e^-15 = 3e-7
    np.testing.assert_array_equal(module.apply({}, dist.mode(), method="decode"), x)
    with pytest.raises(ValueError, match="multiple of the first stage's factor 4"):
        module.apply({}, jnp.zeros((1, 6, 8, 3)), method="encode")
    with pytest.raises(ValueError, match="kind"):
        PixelSpaceConfig(kind="vae")


def test_saved_first_stage_configs_come_back_as_their_kind():
    for cfg in (PixelSpaceConfig(patch_size=2), VAEConfig.tiny()):
        assert config_from_dict("vae", config_to_dict(cfg)) == cfg


def test_a_pixel_space_pipeline_saves_loads_and_keeps_its_objective(tmp_path):
    from configs import demo
    from sdxl_jax.pipeline import Pipeline

    models = demo.demo_models()
    configs = {name: models.config(name) for name in models.components}
    weights = random_weights("base", configs)
    assert weights.params("vae") == {}
    weights.metadata.update(prediction="v_prediction", zero_terminal_snr="true")
    path = save_project(weights, tmp_path / "ckpt")
    loaded = load_pipeline_weights(path)
    assert loaded.config("vae") == configs["vae"] and loaded.params("vae") == {}
    pipe = Pipeline.load(path, dtype="fp32")
    assert pipe.models.base.prediction == "v_prediction"
    assert pipe.table.alphas_cumprod[-1] < 1e-6  # zero terminal SNR
    image = pipe.generate("a red circle on a blue background", height=24, width=40, steps=2, seed=0)
    assert image.shape == (1, 24, 40, 3) and image.dtype == np.uint8
    assert Pipeline.load(path, dtype="fp32", prediction="epsilon").models.base.prediction == "epsilon"  # explicit wins


def test_sdxl_checkpoints_without_objective_metadata_sample_as_sdxl(tmp_path):
    from sdxl_jax.pipeline import Pipeline

    path = save_project(random_weights("base", tiny_configs("base")), tmp_path / "tiny")
    pipe = Pipeline.load(path, dtype="fp32")
    assert pipe.models.base.prediction == "epsilon" and pipe.table.alphas_cumprod[-1] > 1e-3
