"""The Flax UNet computes what diffusers' UNet2DConditionModel computes (CPU, fp32, copied weights)."""

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch_reference import from_nchw, perturb_, state_dict_numpy, to_nchw

from sdxl_jax.conditioning import vector_conditioning
from sdxl_jax.convert import load_unet, unet_config_from_diffusers, unet_params_from_diffusers, unet_params_to_diffusers
from sdxl_jax.models import UNet

TIME_ID_DIM = 8  # addition_time_embed_dim of the tiny text_time configs

SDXL_TINY = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128),
    transformer_layers_per_block=(1, 2, 3),  # level 0 has no attention; the middle block gets 3
    attention_head_dim=(2, 4, 8),  # heads per level (diffusers' naming): head width 16
    cross_attention_dim=48,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_ID_DIM,
    projection_class_embeddings_input_dim=16 + 6 * TIME_ID_DIM,
)
REFINER_TINY = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128, 128),
    transformer_layers_per_block=2,
    attention_head_dim=(2, 4, 8, 8),
    cross_attention_dim=40,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_ID_DIM,
    projection_class_embeddings_input_dim=16 + 5 * TIME_ID_DIM,
)
SD15_TINY = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 96, 96),
    attention_head_dim=4,  # 4 heads everywhere: head widths 8/16/24
    cross_attention_dim=32,
    use_linear_projection=False,  # 1x1 conv proj_in/proj_out
)


def make_reference(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8, **config)
    return perturb_(model, seed)


def random_inputs(model: UNet2DConditionModel, batch: int, height: int, width: int, seed: int = 0):
    """Inputs for both models: (x NHWC, t, context, text_embeds, time_ids or None)."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    x = rng.standard_normal((batch, height, width, 4)).astype(np.float32)
    t = rng.uniform(0, 999, batch).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, cfg.cross_attention_dim)).astype(np.float32)
    if cfg.addition_embed_type is None:
        return x, t, ctx, None, None
    n_ids = (cfg.projection_class_embeddings_input_dim - 16) // TIME_ID_DIM
    text = rng.standard_normal((batch, 16)).astype(np.float32)
    ids = rng.uniform(0, 1024, (batch, n_ids)).round().astype(np.float32)
    return x, t, ctx, text, ids


def reference_forward(model, x, t, ctx, text, ids) -> np.ndarray:
    kwargs = {} if text is None else dict(added_cond_kwargs=dict(text_embeds=torch.from_numpy(text), time_ids=torch.from_numpy(ids)))
    with torch.no_grad():
        out = model(to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample
    return from_nchw(out)


def flax_forward(cfg, params, x, t, ctx, text, ids) -> np.ndarray:
    y = None
    if text is not None:  # SDXL's vector conditioning: pooled text, then each time id embedded
        y = vector_conditioning(text, ids, dim=TIME_ID_DIM)
    return np.asarray(jax.jit(UNet(cfg).apply)({"params": params}, x, t, ctx, y))


def assert_parity(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-5):
    """Max abs error within `rel` of the reference output's scale."""
    scale = float(np.abs(ref).max())
    assert scale > 0.1  # a degenerate (near-zero) output would make the comparison vacuous
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * scale)


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
