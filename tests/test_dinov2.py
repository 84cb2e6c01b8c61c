"""The Flax DINOv2 computes what transformers' Dinov2Model computes (CPU, fp32, perturbed random weights
copied across) at the trained grid and at a non-square grid that resamples the position table; the
resampling is PyTorch's bicubic; the converter is strict and reads both key spellings; `load_dinov2`
reads a weights file and a `save_pretrained` folder; the full-size trees are transformers' (meta device)."""

import re

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from sdxl_jax.convert import ConversionError, load_dinov2, save_dinov2
from sdxl_jax.convert.dinov2 import (
    dinov2_config_at,
    dinov2_config_from_transformers,
    dinov2_key_fn,
    dinov2_params_from_transformers,
    dinov2_params_to_transformers,
    is_legacy,
)
from sdxl_jax.convert.mapping import torch_shapes
from sdxl_jax.models.dinov2 import Dinov2Config, Dinov2Model, abstract_params, dinov2_param_count, resize_bicubic
from tests.helpers.torch_reference import assert_parity, perturb_, state_dict_numpy, to_nchw

RTOL = 1e-5  # max |ours - reference| / max |reference|, per output
TINY = Dinov2Config.tiny(layerscale_value=0.5)  # a 7x7 grid of 4-pixel patches, 2 layers, width 32


def transformers_config(cfg: Dinov2Config) -> transformers.Dinov2Config:
    return transformers.Dinov2Config(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, layerscale_value=cfg.layerscale_value,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference() -> transformers.Dinov2Model:
    torch.manual_seed(0)
    return perturb_(transformers.Dinov2Model(transformers_config(TINY)))


@pytest.fixture(scope="module")
def params(reference):
    return dinov2_params_from_transformers(state_dict_numpy(reference), TINY)


@pytest.mark.parametrize("size, out", [(37, (16, 16)), (37, (23, 74)), (7, (3, 11)), (2, (9, 1))])
def test_position_resampling_is_torch_bicubic(size, out):
    """ViT-S/14's 37x37 table to a 224² input (16x16) and to a non-square one; tiny grids, borders clamped."""
    grid = np.random.default_rng(size).standard_normal((size, size, 8)).astype(np.float32)
    torch_in = torch.from_numpy(grid.transpose(2, 0, 1))[None]
    ref = torch.nn.functional.interpolate(torch_in, size=out, mode="bicubic", align_corners=False)
    ref = ref[0].numpy().transpose(1, 2, 0)
    assert_parity(resize_bicubic(grid, *out), ref, rel=1e-6)
    if size == 37:  # the trap: jax.image.resize's cubic (a = -0.5, antialiased) is another filter
        with pytest.raises(AssertionError):
            assert_parity(jax.image.resize(grid, (*out, 8), "cubic"), ref, rel=1e-2)


@pytest.mark.parametrize(
    "shape, masked",
    [((28, 28), False), ((13, 47), True)],
    ids=["trained-7x7-grid", "non-square-3x11-grid-masked"],  # 13x47: remainder pixels dropped, 7->3 and 7->11
)
def test_matches_transformers(reference, params, shape, masked):
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((2, *shape, 3)).astype(np.float32)
    cells = (shape[0] // TINY.patch_size) * (shape[1] // TINY.patch_size)
    mask = rng.random((2, cells)) < 0.3 if masked else None
    with torch.no_grad():
        torch_mask = None if mask is None else torch.from_numpy(mask)
        ref = reference(to_nchw(pixels), bool_masked_pos=torch_mask, output_hidden_states=True)
    ours = jax.jit(Dinov2Model(TINY).apply)({"params": params}, pixels, mask)
    assert len(ours.hidden_states) == len(ref.hidden_states) == TINY.num_layers + 1
    assert ours.last_hidden_state.shape == (2, 1 + cells, TINY.hidden_size)
    pairs = [(f"hidden_states[{i}]", o, r) for i, (o, r) in enumerate(zip(ours.hidden_states, ref.hidden_states))]
    pairs += [
        ("last_hidden_state", ours.last_hidden_state, ref.last_hidden_state),
        ("pooled", ours.pooled, ref.pooler_output),
    ]
    for name, o, r in pairs:
        assert_parity(o, r.numpy(), rel=RTOL, name=name)


def test_config_translation(reference):
    assert dinov2_config_from_transformers(reference.config.to_dict()) == TINY
    config = reference.config.to_dict()
    refusals = {
        "use_swiglu_ffn": config | dict(use_swiglu_ffn=True),
        "model_type": config | dict(model_type="dinov2_with_registers"),
        "image_size": config | dict(image_size=[28, 32]),
        "hidden_act": config | dict(hidden_act="relu"),
    }
    for field, bad in refusals.items():
        with pytest.raises(ConversionError, match=field):
            dinov2_config_from_transformers(bad)


def test_both_key_spellings_import_and_export_exactly(reference, params):
    native = state_dict_numpy(reference)  # transformers 5 names
    legacy = dinov2_params_to_transformers(params, legacy=True)
    assert not is_legacy(native) and is_legacy(legacy)
    assert "encoder.layer.1.attention.attention.query.weight" in legacy
    assert "encoder.layer.1.attention.output.dense.bias" in legacy
    jax.tree.map(np.testing.assert_array_equal, dinov2_params_from_transformers(legacy, TINY), params)
    back = dinov2_params_to_transformers(params, legacy=False)
    assert back.keys() == native.keys()
    for key, value in native.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize("spelling", ["transformers5", "transformers4"])
def test_conversion_is_strict(params, spelling):
    state = dinov2_params_to_transformers(params, legacy=spelling == "transformers4")
    convert = lambda s: dinov2_params_from_transformers(s, TINY)
    broken = {
        "embeddings.mask_token": {k: v for k, v in state.items() if k != "embeddings.mask_token"},  # missing
        "encoder.layer.2.norm1.weight": state | {"encoder.layer.2.norm1.weight": np.ones(32, np.float32)},  # unexpected
        "embeddings.position_embeddings": state | {"embeddings.position_embeddings": np.zeros((1, 37, 32), np.float32)},
    }
    for kind, (key, bad) in zip(("missing", "unexpected", "shape mismatch"), broken.items()):
        with pytest.raises(ConversionError, match=rf"{kind} \(1\):\n\s+{re.escape(key)}"):
            convert(bad)
    # One key of the other spelling: every attention projection of the detected one is then out of place.
    other = dinov2_params_to_transformers(params, legacy=spelling != "transformers4")
    stray = next(k for k in other if k not in state)
    named = stray if spelling == "transformers4" else "encoder.layer.0.attention.q_proj.weight"
    with pytest.raises(ConversionError, match=rf"(?s)unexpected \(\d+\):.*{re.escape(named)}"):
        convert(state | {stray: other[stray]})


def test_load_dinov2_from_a_file_and_a_save_pretrained_folder(reference, params, tmp_path):
    reference.save_pretrained(tmp_path / "dinov2")  # transformers 5.23 writes the transformers 4 names
    cfg, loaded = load_dinov2(tmp_path / "dinov2", dtype="bfloat16")
    assert cfg == TINY.replace(dtype="bfloat16")
    with safe_open(tmp_path / "dinov2" / "model.safetensors", "np") as f:
        assert set(f.keys()) == dinov2_params_to_transformers(params, legacy=True).keys()
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

    save_file(state_dict_numpy(reference), tmp_path / "dinov2.safetensors")  # transformers 5 names
    cfg, loaded = load_dinov2(tmp_path / "dinov2.safetensors", TINY)
    assert cfg == TINY
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    # the caller's param_dtype is honoured, not replaced by the stored one
    save_file({k: v.astype(np.float16) for k, v in state_dict_numpy(reference).items()}, tmp_path / "half.safetensors")
    cfg, loaded = load_dinov2(tmp_path / "half.safetensors", TINY.replace(param_dtype="bfloat16"))
    assert cfg == TINY.replace(param_dtype="bfloat16")
    assert {leaf.dtype.name for leaf in jax.tree.leaves(loaded)} == {"bfloat16"}
    with pytest.raises(ValueError, match="pass cfg"):
        load_dinov2(tmp_path / "dinov2.safetensors")
    with pytest.raises(ConversionError, match="missing"):  # a file checked against the wrong architecture
        load_dinov2(tmp_path / "dinov2.safetensors", TINY.replace(num_layers=3))


def test_save_dinov2_writes_a_folder_transformers_loads(reference, params, tmp_path):
    """`save_dinov2`: transformers' `from_pretrained` reads it back to the same weights, and so does
    `load_dinov2` (config included); `dinov2_config_at` reads the architecture alone."""
    folder = save_dinov2(tmp_path / "ours", TINY, params)
    again = transformers.Dinov2Model.from_pretrained(folder)
    want = state_dict_numpy(reference)
    assert state_dict_numpy(again).keys() == want.keys()
    for key, value in state_dict_numpy(again).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    cfg, loaded = load_dinov2(folder)
    assert cfg == TINY and dinov2_config_at(folder, Dinov2Config.vit_l14()) == TINY
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert dinov2_config_at(folder / "model.safetensors", Dinov2Config.vit_l14()) == Dinov2Config.vit_l14()


def test_full_size_trees_are_transformers():
    """ViT-S/14: the count and every key's shape against transformers' model built on the meta device
    (nothing allocated); ViT-L/14, the same layers wider and deeper: its count (one trace)."""
    cfg, count = Dinov2Config.vit_s14(), 22_056_576
    assert dinov2_param_count(cfg) == dinov2_param_count(cfg.replace(param_dtype="bfloat16", remat="full")) == count
    with torch.device("meta"):
        model = transformers.Dinov2Model(transformers_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == count
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert torch_shapes(abstract_params(cfg), dinov2_key_fn(legacy=False)) == theirs
    assert dinov2_param_count(Dinov2Config.vit_l14()) == 304_368_640
