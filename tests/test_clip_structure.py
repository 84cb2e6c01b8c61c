"""Full-size text-encoder checks that cost nothing (eval_shape, the real checkpoint's key manifest),
config translation and validation, strict conversion, pooling rules and input errors. No torch."""

import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from sdxl_jax.convert import ConversionError
from sdxl_jax.convert.text_encoder import (
    TEXT_MODEL_PREFIX,
    text_encoder_config_from_transformers,
    text_encoder_params_from_transformers,
    text_encoder_params_to_transformers,
)
from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel, abstract_params, clip_param_count, end_token_positions
from sdxl_jax.sharding import FSDP_RULES, logical_names_in, param_shardings

FIXTURES = Path(__file__).parent / "fixtures"
PRESETS = {"text_encoder": CLIPTextConfig.clip_vit_l14, "text_encoder_2": CLIPTextConfig.openclip_vit_bigg14}


def transformers_config(model: str, component: str) -> dict:
    return json.loads((FIXTURES / "sdxl_diffusers_configs.json").read_text())[model][component]


def manifest(model: str, component: str) -> dict:
    """The real SDXL text encoder's `tensors` (name -> shape; transformers 4.30 `text_model.` keys) and
    `param_count`."""
    with gzip.open(FIXTURES / f"sdxl_{model}_diffusers_keys.json.gz", "rt") as f:
        return json.load(f)["components"][component]


@pytest.mark.parametrize(
    "preset, count", [(CLIPTextConfig.clip_vit_l14, 123_060_480), (CLIPTextConfig.openclip_vit_bigg14, 694_659_840)]
)
def test_full_size_parameter_counts(preset, count):
    assert clip_param_count(preset()) == count
    assert clip_param_count(preset(param_dtype="bfloat16", remat="full")) == count


@pytest.mark.parametrize(
    "model, component",
    [("sdxl-base-1.0", "text_encoder"), ("sdxl-base-1.0", "text_encoder_2"), ("sdxl-refiner-1.0", "text_encoder_2")],
)
def test_public_configs_translate_to_the_presets(model, component):
    assert text_encoder_config_from_transformers(transformers_config(model, component)) == PRESETS[component]()


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
@pytest.mark.parametrize("prefixed", [True, False], ids=["text_model-prefixed", "unprefixed"])
def test_full_size_keys_cover_the_real_checkpoint(component, prefixed):
    """Every tensor of the released SDXL text encoder maps to a parameter of the right shape, strictly.

    The tensors are zero-stride broadcast views and the layout maps are transposes: nothing is allocated.
    """
    shapes = manifest("base", component)["tensors"]
    assert f"{TEXT_MODEL_PREFIX}embeddings.position_ids" in shapes  # ignored, as a known buffer
    rename = (lambda k: k) if prefixed else (lambda k: k.removeprefix(TEXT_MODEL_PREFIX))
    state = {rename(k): np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    params = text_encoder_params_from_transformers(state, PRESETS[component]())
    assert sum(p.size for p in jax.tree.leaves(params)) == manifest("base", component)["param_count"]
    cfg = PRESETS[component]()
    last_fc1 = params[f"layers_{cfg.num_layers - 1}"]["mlp"]["fc1"]["kernel"]
    assert last_fc1.shape == (cfg.hidden_size, cfg.intermediate_size)  # transposed from torch's [out, in]


def test_refiner_text_encoder_2_is_the_base_one():
    assert manifest("refiner", "text_encoder_2")["tensors"] == manifest("base", "text_encoder_2")["tensors"]


def tiny_state(cfg: CLIPTextConfig, prefixed: bool = True) -> dict[str, np.ndarray]:
    """A complete transformers state dict of `cfg` (zeros; only names and shapes matter here)."""
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), meta.unbox(abstract_params(cfg)))
    return text_encoder_params_to_transformers(params, cfg, prefixed=prefixed)


def test_projection_must_match_the_config():
    with_projection, without = CLIPTextConfig.tiny(projection_dim=8), CLIPTextConfig.tiny()
    with pytest.raises(ConversionError, match=r"unexpected \(1\):\n\s+text_projection.weight"):
        text_encoder_params_from_transformers(tiny_state(with_projection), without)
    with pytest.raises(ConversionError, match=r"missing \(1\):\n\s+text_projection.weight"):
        text_encoder_params_from_transformers(tiny_state(without), with_projection)
    # Mixed key forms: the prefixed form is detected and the unprefixed keys are named.
    mixed = tiny_state(without) | {"encoder.layers.0.mlp.fc1.bias": np.zeros(64, np.float32)}
    with pytest.raises(ConversionError, match=r"\(prefixed keys\)") as err:
        text_encoder_params_from_transformers(mixed, without)
    assert "unexpected (1):\n    encoder.layers.0.mlp.fc1.bias" in str(err.value)


def test_unsupported_transformers_configs_are_refused():
    base = transformers_config("sdxl-base-1.0", "text_encoder_2")
    for change, message in (
        (dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
        (dict(architectures=["CLIPModel"]), "architectures"),
        (dict(architectures=None), "architectures"),
        (dict(model_type="clip"), "text_config"),
        (dict(eos_token_id=[2, 3]), "list of end tokens"),
    ):
        with pytest.raises(ConversionError, match=message):
            text_encoder_config_from_transformers(base | change)
    # transformers' eos rule: 2 means argmax; anything else (or its default 49407) the first occurrence.
    assert text_encoder_config_from_transformers(base | dict(eos_token_id=49407)).eos_token_id == 49407
    no_eos = {k: v for k, v in base.items() if k != "eos_token_id"}
    assert text_encoder_config_from_transformers(no_eos).eos_token_id == 49407
    assert text_encoder_config_from_transformers(base, dtype="bfloat16").dtype == "bfloat16"


def test_config_validation():
    for change, message in (
        (dict(num_heads=5), "does not split into 5 heads"),
        (dict(activation="relu"), "activation 'relu'"),
        (dict(eos_token_id=2), "argmax rule"),
        (dict(projection_dim=0), "projection_dim"),
        (dict(attention="flash3000"), "attention"),
        (dict(remat="some"), "remat"),
        (dict(dtype="float31"), "float31"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            CLIPTextConfig.tiny(**change)


def test_end_token_rules():
    ids = jnp.array([[49406, 320, 49407, 49407, 49407], [49406, 49407, 0, 0, 0], [49406, 5, 7, 9, 11]])
    # argmax: the first of tied maxima (CLIP-L pads with the end token), else the largest id.
    np.testing.assert_array_equal(end_token_positions(ids, None), [2, 1, 0])
    np.testing.assert_array_equal(end_token_positions(ids, 9), [0, 0, 3])  # absent -> 0, as transformers


def test_bad_inputs_are_refused_with_clear_errors():
    cfg = CLIPTextConfig.tiny()
    params = meta.unbox(abstract_params(cfg))
    apply = lambda *args: jax.eval_shape(CLIPTextModel(cfg).apply, {"params": params}, *args)
    out = apply(jnp.zeros((2, 16), jnp.int32))
    assert len(out.hidden_states) == 4 and out.pooled.shape == (2, 32) and out.text_embeds is None
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings 16"):
        apply(jnp.zeros((2, 17), jnp.int32))
    with pytest.raises(ValueError, match="input_ids must be an integer"):
        apply(jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match=r"input_ids must be an integer \[B, L\]"):
        apply(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"eot_positions must be an integer \[2\] array"):
        apply(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 1), jnp.int32))


def test_logical_axis_names():
    names = logical_names_in(abstract_params(CLIPTextConfig.tiny(projection_dim=8)))
    assert names == {"vocab", "length", "embed", "heads", "mlp", "norm", "vector"}


def test_every_name_has_a_sharding_rule():
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    param_shardings(abstract_params(CLIPTextConfig.openclip_vit_bigg14()), mesh, FSDP_RULES)  # raises on a gap
