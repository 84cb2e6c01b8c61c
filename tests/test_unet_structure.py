"""Full-size UNet checks that cost nothing (eval_shape), config validation, and strict conversion."""

import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from sdxl_jax.convert import ConversionError, unet_config_from_diffusers
from sdxl_jax.convert.unet import unet_params_to_diffusers
from sdxl_jax.models import UNet, UNetConfig
from sdxl_jax.models.unet import abstract_params, unet_param_count

FIXTURES = Path(__file__).parent / "fixtures"


def diffusers_config(model: str) -> dict:
    return json.loads((FIXTURES / "sdxl_diffusers_configs.json").read_text())[model]["unet"]


def manifest(model: str) -> dict[str, list[int]]:
    """Tensor name -> shape of the real SDXL UNet in diffusers layout."""
    with gzip.open(FIXTURES / f"sdxl_{model}_diffusers_keys.json.gz", "rt") as f:
        return json.load(f)["components"]["unet"]["tensors"]


def placeholder_params(cfg: UNetConfig) -> dict:
    """A numpy param tree of `cfg`'s shapes that holds no bytes: elements of a zero-size dtype, so the
    exporter's transposes and contiguous copies of a full-size tree move nothing."""
    abstract = meta.unbox(abstract_params(cfg))
    return jax.tree.map(lambda s: np.empty(s.shape, np.dtype([])), abstract)


@pytest.mark.parametrize(
    "preset, model, count",
    [(UNetConfig.sdxl_base, "base", 2_567_463_684), (UNetConfig.sdxl_refiner, "refiner", 2_259_526_660)],
)
def test_full_size_parameter_count_and_config(preset, model, count):
    assert unet_param_count(preset()) == count
    assert unet_param_count(preset(scan_layers=True)) == count
    # The public diffusers config.json translates to exactly the preset.
    assert unet_config_from_diffusers(diffusers_config(f"sdxl-{model}-1.0")) == preset()


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_full_size_keys_cover_the_real_checkpoint(model):
    """Every tensor of the real diffusers UNet maps to a parameter of the right shape, and back."""
    cfg = UNetConfig.sdxl_base() if model == "base" else UNetConfig.sdxl_refiner()
    # Export the full-size tree (zero-byte placeholders) through the converters' own table.
    exported = unet_params_to_diffusers(placeholder_params(cfg), cfg)
    assert {k: list(v.shape) for k, v in exported.items()} == manifest(model)


def test_unsupported_diffusers_configs_are_refused():
    base = diffusers_config("sdxl-base-1.0")
    for change in (
        dict(time_embedding_type="fourier"),
        dict(addition_embed_type="text"),
        dict(resnet_time_scale_shift="scale_shift"),
        dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
        dict(up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ):
        with pytest.raises(ConversionError):
            unet_config_from_diffusers(base | change)


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of head_dim and num_heads"):
        UNetConfig.tiny(num_heads=4)
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig.tiny(transformer_depth=(0, 1))
    with pytest.raises(ValueError, match="attention"):
        UNetConfig.tiny(attention="flash3000")
    with pytest.raises(ValueError, match="remat"):
        UNetConfig.tiny(remat="some")
    with pytest.raises(ValueError, match="norm groups"):
        UNetConfig.tiny(norm_groups=7)


def test_bad_inputs_are_refused_with_clear_errors():
    cfg = UNetConfig.tiny()
    params = meta.unbox(abstract_params(cfg))
    unet = UNet(cfg)
    x, t = jnp.zeros((2, 8, 12, 4)), jnp.zeros((2,))
    ctx, y = jnp.zeros((2, 5, cfg.context_dim)), jnp.zeros((2, cfg.adm_in_channels))
    jax.eval_shape(unet.apply, {"params": params}, x, t, ctx, y)  # valid, non-square
    with pytest.raises(ValueError, match="multiple of the UNet's downsampling factor 4"):
        jax.eval_shape(unet.apply, {"params": params}, jnp.zeros((2, 8, 10, 4)), t, ctx, y)
    with pytest.raises(ValueError, match="y must be given"):
        jax.eval_shape(unet.apply, {"params": params}, x, t, ctx, None)
    with pytest.raises(ValueError, match="context shape"):
        jax.eval_shape(unet.apply, {"params": params}, x, t, jnp.zeros((2, 5, 7)), y)
