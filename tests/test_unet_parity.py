"""The Flax UNet computes what diffusers' UNet2DConditionModel computes (CPU, fp32, copied weights)."""

import jax
import numpy as np
import pytest

from sdxl_jax.conditioning import vector_conditioning
from sdxl_jax.convert import load_unet, unet_config_from_diffusers, unet_params_from_diffusers, unet_params_to_diffusers
from sdxl_jax.models import UNet
from tests.helpers.torch_reference import assert_parity, state_dict_numpy
from tests.helpers.unet_reference import (
    REFINER_TINY,
    SD15_TINY,
    SDXL_TINY,
    TIME_ID_DIM,
    make_reference,
    random_inputs,
    reference_forward,
)


def flax_forward(cfg, params, x, t, ctx, text, ids) -> np.ndarray:
    y = None
    if text is not None:  # SDXL's vector conditioning: pooled text, then each time id embedded
        y = vector_conditioning(text, ids, dim=TIME_ID_DIM)
    return np.asarray(jax.jit(UNet(cfg).apply)({"params": params}, x, t, ctx, y))


@pytest.mark.parametrize(
    "config, batch, hw",
    [(SDXL_TINY, 2, (16, 24)), (REFINER_TINY, 3, (24, 16)), (SD15_TINY, 2, (16, 8))],
    ids=["sdxl", "refiner", "sd15"],
)
def test_unet_matches_diffusers(config, batch, hw):
    ref_model = make_reference(config)
    cfg = unet_config_from_diffusers(dict(ref_model.config))
    params = unet_params_from_diffusers(state_dict_numpy(ref_model), cfg)
    inputs = random_inputs(ref_model, batch, *hw)
    assert_parity(flax_forward(cfg, params, *inputs), reference_forward(ref_model, *inputs))


def test_config_translation_of_tiny_shapes():
    sdxl = unet_config_from_diffusers(dict(make_reference(SDXL_TINY).config))
    assert (sdxl.channel_mult, sdxl.transformer_depth, sdxl.transformer_depth_middle) == ((1, 2, 4), (0, 2, 3), 3)
    assert (sdxl.head_dim, sdxl.num_heads, sdxl.adm_in_channels, sdxl.downsample_factor) == (16, None, 64, 4)
    sd15 = unet_config_from_diffusers(dict(make_reference(SD15_TINY).config))
    assert (sd15.head_dim, sd15.num_heads, sd15.adm_in_channels, sd15.use_linear_projection) == (None, 4, None, False)
    assert sd15.transformer_depth == (1, 1, 1, 0) and sd15.downsample_factor == 8


def test_scan_and_remat_give_the_same_function(tmp_path):
    """Loading into the scanned (stacked-blocks) layout with full remat changes nothing numerically."""
    ref_model = make_reference(SDXL_TINY, seed=1)
    ref_model.save_pretrained(tmp_path / "unet", safe_serialization=True)
    inputs = random_inputs(ref_model, 2, 8, 12, seed=1)
    expected = reference_forward(ref_model, *inputs)
    cfg, params = load_unet(tmp_path / "unet", scan_layers=True, remat="full")
    stacked = params["down_blocks_2"]["attentions_0"]["transformer_blocks"]["attn1"]["to_q"]["kernel"]
    assert stacked.shape == (3, 128, 128)  # depth 3 stacked on a leading 'layers' axis
    assert_parity(flax_forward(cfg, params, *inputs), expected)


def test_export_is_the_exact_inverse_of_import():
    for config in (SDXL_TINY, SD15_TINY):
        state = state_dict_numpy(make_reference(config))
        for scan in (False, True):
            cfg = unet_config_from_diffusers(dict(make_reference(config).config), scan_layers=scan)
            back = unet_params_to_diffusers(unet_params_from_diffusers(state, cfg), cfg)
            assert back.keys() == state.keys()
            for key, value in state.items():
                np.testing.assert_array_equal(back[key], value, err_msg=key)
