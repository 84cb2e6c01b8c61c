"""The single-file (sgm) <-> diffusers key and tensor map: coverage of the real SDXL base and refiner
checkpoints from their key manifests (nothing allocated), agreement with diffusers' own converter's
trace, bit-exact round trips on tiny SDXL-shaped models, diffusers' converters as an independent
oracle of our export, and errors that name the offenders."""

import functools
import gzip
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL
from diffusers.loaders import single_file_utils as diffusers_sf

from sdxl_jax.convert import ConversionError
from sdxl_jax.convert.single_file import (
    OP_KINDS,
    SingleFileLayout,
    diffusers_shapes,
    diffusers_to_single_file,
    iter_single_file_to_diffusers,
    single_file_plan,
    single_file_to_diffusers,
)
from sdxl_jax.convert.single_file_keys import BIGG_PREFIXES, detect_model, ignorable_keys
from sdxl_jax.convert.text_encoder import TEXT_MODEL_PREFIX, text_encoder_config_from_transformers
from sdxl_jax.convert.unet import unet_config_from_diffusers
from sdxl_jax.convert.vae import vae_config_from_diffusers
from tests.helpers.torch_reference import perturb_, state_dict_numpy
from tests.helpers.unet_reference import REFINER_TINY, SDXL_TINY
from tests.helpers.unet_reference import make_reference as make_unet

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ("base", "refiner")
VAE_TINY = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 64, 64],
    layers_per_block=2,
    norm_num_groups=8,
)


def fixture(name: str) -> dict:
    with gzip.open(FIXTURES / f"{name}.json.gz", "rt") as f:
        return json.load(f)


@functools.cache
def single_file_manifest(model: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in fixture(f"sdxl_{model}_single_file_keys")["tensors"].items()}


@functools.cache
def diffusers_manifest(model: str) -> dict[str, dict[str, tuple[int, ...]]]:
    components = fixture(f"sdxl_{model}_diffusers_keys")["components"]
    return {c: {k: tuple(v) for k, v in d["tensors"].items()} for c, d in components.items()}


def without_position_ids(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in shapes.items() if not k.endswith("position_ids")}


class ShapeOnlyState(Mapping):
    """A lazy single-file state dict of zero-stride placeholders that records every read; like the
    file readers it gives shapes and dtypes without a read (`mapping.shape_of`)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes, self.reads = dict(shapes), []

    def __getitem__(self, key: str) -> np.ndarray:
        self.reads.append(key)
        return np.broadcast_to(np.float32(0), self.shapes[key])

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.shapes[key])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(np.float32)


# --- full size, from the manifests ----------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_detects_base_and_refiner(model):
    assert detect_model(single_file_manifest(model)) == model


@pytest.mark.parametrize("model", MODELS)
def test_plan_covers_the_real_single_file(model):
    """Planned from the diffusers manifest, the ops name exactly the single file's tensors and shapes,
    apart from the ignorable buffers."""
    plan = single_file_plan(model, diffusers_manifest(model))
    planned = {op.single_file: op.single_file_shape for op in plan}
    manifest = single_file_manifest(model)
    assert len(planned) == len(plan)
    assert manifest.keys() - planned.keys() == ignorable_keys(model)
    assert planned == {k: v for k, v in manifest.items() if k not in ignorable_keys(model)}
    assert {op.component for op in plan} == set(diffusers_manifest(model))


@pytest.mark.parametrize("model", MODELS)
def test_import_and_export_of_the_real_key_sets(model):
    """Import from shapes alone reads every tensor once and gives the diffusers manifest exactly;
    export gives the single-file manifest back (less the ignorable buffers)."""
    state = ShapeOnlyState(single_file_manifest(model))
    expected = diffusers_manifest(model)
    out = single_file_to_diffusers(state, shapes=expected)
    assert {c: {k: v.shape for k, v in d.items()} for c, d in out.items()} == {
        c: without_position_ids(d) for c, d in expected.items()
    }
    ignorable = ignorable_keys(model)
    assert sorted(state.reads) == sorted(k for k in state.shapes if k not in ignorable)  # each read once
    back = diffusers_to_single_file(out, model, shapes=expected)
    assert {k: v.shape for k, v in back.items()} == {k: v for k, v in state.shapes.items() if k not in ignorable}


@pytest.mark.parametrize("model", MODELS)
def test_plan_agrees_with_the_diffusers_converter_trace(model):
    """Same single-file <-> diffusers pairs, ops and shapes as diffusers' own conversion of the real layout."""
    trace = fixture(f"sdxl_{model}_single_file_to_diffusers_keymap")
    kinds = {"copy": "copy", "squeeze_1x1_conv_to_linear": "squeeze", "transpose": "transpose"}
    traced = set()
    for row in trace["rows"]:
        if row["sgm"] in ignorable_keys(model):  # diffusers copies CLIP-L's position_ids buffer; we drop it
            assert row["sgm"].endswith("position_ids")
            continue
        kind, part = kinds.get(row["op"], "split"), 0
        if kind == "split":
            part = "qkv".index(row["op"][-2])  # "rows[a:b] of fused in_proj (q)"
        rows = (row["sgm"], tuple(row["sgm_shape"]), row["component"], row["diffusers"], tuple(row["diffusers_shape"]))
        traced.add((*rows, kind, part))
    plan = single_file_plan(model, diffusers_manifest(model))
    planned = {
        (op.single_file, op.single_file_shape, op.component, key, shape, op.kind, part)
        for op in plan
        for part, (key, shape) in enumerate(zip(op.diffusers, op.diffusers_shapes))
    }
    assert planned == traced
    assert set(trace["sgm_keys_not_consumed"]) <= ignorable_keys(model)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_flax_models_give_the_real_diffusers_shapes(model):
    """The default expected tensors (from the Flax models via eval_shape) are the real checkpoint's."""
    expected = {c: without_position_ids(d) for c, d in diffusers_manifest(model).items()}
    assert diffusers_shapes(model) == expected


# --- ops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(OP_KINDS))
def test_each_op_kind_inverts_exactly(kind):
    op = OP_KINDS[kind]
    diffusers_shapes_ = {"copy": ((5, 3, 3, 3),), "squeeze": ((6, 4),), "transpose": ((6, 4),), "split": ((4, 6),) * 3}
    parts = tuple(np.random.default_rng(0).standard_normal(s, dtype=np.float32) for s in diffusers_shapes_[kind])
    assert len(parts) == op.parts
    stacked = op.inverse(parts)
    assert stacked.shape == op.single_file_shape(diffusers_shapes_[kind])
    for got, want in zip(op.forward(stacked), parts, strict=True):
        np.testing.assert_array_equal(got, want)


def test_split_stacks_q_k_v_by_rows():
    op = OP_KINDS["split"]
    q, k, v = (np.full((2, 3), i, np.float32) for i in range(3))
    np.testing.assert_array_equal(op.inverse((q, k, v))[:, 0], [0, 0, 1, 1, 2, 2])


# --- tiny SDXL-shaped models ----------------------------------------------------------------------


def _clip(cls, hidden: int, layers: int, activation: str, seed: int):
    config = transformers.CLIPTextConfig(
        vocab_size=64, max_position_embeddings=16, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, hidden_act=activation, projection_dim=24,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    return perturb_(cls(config), seed)


@functools.cache
def tiny(model: str):
    """(layout, torch models by component) of an SDXL-shaped tiny base or refiner."""
    unet = make_unet(SDXL_TINY if model == "base" else REFINER_TINY, seed=1)
    torch.manual_seed(2)
    vae = perturb_(AutoencoderKL(**VAE_TINY), seed=2)
    models = {"unet": unet, "vae": vae}
    if model == "base":
        models["text_encoder"] = _clip(transformers.CLIPTextModel, 32, 2, "quick_gelu", seed=3)
    models["text_encoder_2"] = _clip(transformers.CLIPTextModelWithProjection, 40, 3, "gelu", seed=4)
    texts = {c: text_encoder_config_from_transformers(models[c].config.to_dict()) for c in models if "text" in c}
    layout = SingleFileLayout(
        unet_config_from_diffusers(dict(unet.config)),
        vae_config_from_diffusers(dict(vae.config)),
        texts.get("text_encoder"),
        texts["text_encoder_2"],
    )
    assert layout.model == model
    return layout, models


def prefixed(component: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A text-encoder state dict in the `text_model.`-prefixed form."""
    if component.startswith("text") and not any(k.startswith(TEXT_MODEL_PREFIX) for k in state):
        return {k if k.startswith("text_projection") else TEXT_MODEL_PREFIX + k: v for k, v in state.items()}
    return dict(state)


def assert_identical(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]):
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert np.array_equal(got[key], value), key


@pytest.mark.parametrize("model", MODELS)
def test_tiny_round_trip_is_bit_exact(model):
    layout, models = tiny(model)
    components = {c: state_dict_numpy(m) for c, m in models.items()}
    if model == "base":  # transformers >= 5.6: CLIPTextModel keys are unprefixed; bigG's are prefixed
        assert not any(k.startswith(TEXT_MODEL_PREFIX) for k in components["text_encoder"])
    single_file = diffusers_to_single_file(components, layout)
    assert detect_model(single_file) == model
    assert len(single_file) == len(single_file_plan(layout))
    back = single_file_to_diffusers(single_file, layout)
    assert list(back) == list(layout.components)
    for component, state in components.items():
        assert_identical(back[component], prefixed(component, state))
    # streaming: the same, one component at a time
    for component, state in iter_single_file_to_diffusers(single_file, layout):
        assert_identical(state, back[component])


def test_split_parts_asked_for_interleaved_read_each_source_once():
    """Loaders read from several threads, so q/k/v of two layers interleave; bigG's stacked in_proj of
    each layer must still be read once (the cache held only the last source and re-read it)."""
    layout, models = tiny("base")
    single_file = diffusers_to_single_file({c: state_dict_numpy(m) for c, m in models.items()}, layout)
    reads = []

    class Counting(dict):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    state = dict(iter_single_file_to_diffusers(Counting(single_file), layout))["text_encoder_2"]
    layers = [[k for k in state if f"layers.{i}.self_attn." in k and "out_proj" not in k] for i in range(2)]
    assert len(layers[0]) == 6  # q, k, v weights and biases
    reads.clear()  # the checks above read shapes through the mapping
    got = {key: state[key] for pair in zip(*layers) for key in pair}  # layer 0 and layer 1 alternating
    assert len(reads) == len(set(reads)) == 4, reads  # two in_proj weights and biases
    want = dict(single_file_to_diffusers(single_file, layout)["text_encoder_2"])
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key])


def test_both_text_encoder_key_forms_and_old_buffers_export_alike():
    layout, models = tiny("base")
    components = {c: state_dict_numpy(m) for c, m in models.items()}
    reference = diffusers_to_single_file(components, layout)
    old_style = dict(components)  # transformers < 4.31: `text_model.` keys and a position_ids buffer
    for c in ("text_encoder", "text_encoder_2"):
        old_style[c] = prefixed(c, components[c]) | {"text_model.embeddings.position_ids": np.arange(16)[None]}
    assert_identical(diffusers_to_single_file(old_style, layout), reference)


@pytest.mark.parametrize("model", MODELS)
def test_diffusers_converters_read_our_export(model):
    """diffusers' own single-file converters, applied to our export, give the original state dicts:
    the same as our import, bit for bit."""
    layout, models = tiny(model)
    components = {c: state_dict_numpy(m) for c, m in models.items()}
    single_file = diffusers_to_single_file(components, layout)
    ours = single_file_to_diffusers(single_file, layout)
    checkpoint = {k: torch.from_numpy(v) for k, v in single_file.items()}
    oracle = {
        "unet": diffusers_sf.convert_ldm_unet_checkpoint(checkpoint, dict(models["unet"].config)),
        "vae": diffusers_sf.convert_ldm_vae_checkpoint(checkpoint, dict(models["vae"].config)),
        "text_encoder_2": diffusers_sf.convert_open_clip_checkpoint(
            models["text_encoder_2"], checkpoint, prefix=BIGG_PREFIXES[model]
        ),
    }
    if model == "base":
        oracle["text_encoder"] = diffusers_sf.convert_ldm_clip_checkpoint(checkpoint)
    assert sorted(oracle) == sorted(ours)
    for component, state in oracle.items():
        state = {k: v.numpy() for k, v in state.items()}
        assert_identical(state, ours[component])
        assert_identical(state, prefixed(component, components[component]))


def test_default_shapes_come_from_the_flax_models():
    layout, models = tiny("base")
    shapes = diffusers_shapes(layout)
    for component, module in models.items():
        want = {k: tuple(v.shape) for k, v in prefixed(component, state_dict_numpy(module)).items()}
        assert shapes[component] == want


# --- errors ---------------------------------------------------------------------------------------


SD15_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
TWO_BIGG = ["conditioner.embedders.0.model.ln_final.bias", "conditioner.embedders.1.model.ln_final.bias"]


@pytest.mark.parametrize(
    "text_keys, message",
    [
        ([SD15_TEXT], r"SD 1.x checkpoint .* Found: cond_stage_model.transformer \(1 tensors\)"),
        ([SD2_TEXT], r"SD 2.x checkpoint .* Found: cond_stage_model.model \(1 tensors\)"),
        ([], r"not an SDXL single file.* Found: first_stage_model \(1 tensors\), model.diffusion_model \(1 tensors\)"),
        (TWO_BIGG, r"conditioner.embedders.0.model \(1 tensors\), conditioner.embedders.1.model \(1 tensors\)"),
    ],
)
def test_other_checkpoints_are_refused_by_name(text_keys, message):
    keys = text_keys + ["model.diffusion_model.out.2.bias", "first_stage_model.encoder.conv_in.weight"]
    with pytest.raises(ConversionError, match=message) as info:
        detect_model(keys)
    assert "only SDXL base/refiner single files are supported" in str(info.value)


def test_import_names_every_offender():
    shapes = diffusers_manifest("refiner")
    state = ShapeOnlyState(single_file_manifest("refiner"))
    del state.shapes["model.diffusion_model.out.2.bias"]
    state.shapes["model.diffusion_model.extra.weight"] = (1,)
    with pytest.raises(ConversionError) as info:
        single_file_to_diffusers(state, shapes=shapes)
    message = str(info.value)
    assert "missing (1)" in message and "model.diffusion_model.out.2.bias" in message
    assert "unexpected (1)" in message and "model.diffusion_model.extra.weight" in message
    assert state.reads == []  # refused before reading any tensor

    state = ShapeOnlyState(single_file_manifest("refiner"))
    state.shapes["first_stage_model.encoder.mid.attn_1.q.weight"] = (512, 512)
    wrong = r"first_stage_model.encoder.mid.attn_1.q.weight: \(512, 512\), expected \(512, 512, 1, 1\)"
    with pytest.raises(ConversionError, match=wrong):
        single_file_to_diffusers(state, shapes=shapes)
    refiner = ShapeOnlyState(single_file_manifest("refiner"))
    with pytest.raises(ConversionError, match="SDXL refiner single file, but a base layout"):
        single_file_to_diffusers(refiner, "base", shapes=diffusers_manifest("base"))


def test_many_offenders_are_listed_up_to_twenty_with_a_count():
    state = ShapeOnlyState(single_file_manifest("refiner"))
    for key in [k for k in state.shapes if k.startswith("model.diffusion_model.output_blocks.")][:25]:
        del state.shapes[key]
    with pytest.raises(ConversionError, match=r"missing \(25\):(\n    \S+){20}\n    ... and 5 more"):
        single_file_to_diffusers(state, shapes=diffusers_manifest("refiner"))


def test_export_names_every_offender():
    layout, models = tiny("refiner")
    components = {c: state_dict_numpy(m) for c, m in models.items()}
    broken = dict(components, unet=dict(components["unet"]))
    del broken["unet"]["conv_out.bias"]
    broken["unet"]["conv_out.extra"] = np.zeros(1)
    both = r"missing \(1\):\n    unet: conv_out.bias\n  unexpected \(1\):\n    unet: conv_out.extra"
    with pytest.raises(ConversionError, match=both):
        diffusers_to_single_file(broken, layout)
    broken = dict(components, vae=dict(components["vae"]))
    broken["vae"]["decoder.conv_in.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"vae: decoder.conv_in.bias: \(3,\), expected \(64,\)"):
        diffusers_to_single_file(broken, layout)
    with pytest.raises(ConversionError, match="holds .*'text_encoder_2'"):
        diffusers_to_single_file({c: s for c, s in components.items() if c != "text_encoder_2"}, layout)


def test_plan_refuses_tensors_it_cannot_name():
    shapes = {c: dict(d) for c, d in diffusers_manifest("refiner").items()}
    shapes["unet"]["class_embedding.weight"] = (10, 1536)  # an SD upscaler's class embedding
    del shapes["text_encoder_2"]["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ConversionError) as info:
        single_file_plan("refiner", shapes)
    message = str(info.value)
    assert "unet: no single-file name for diffusers key 'class_embedding.weight'" in message
    assert "resblocks.0.attn.in_proj_weight: split needs 3 diffusers tensors" in message
