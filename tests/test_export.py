"""Export back to PyTorch: diffusers folders that `from_pretrained` loads and original single files that
`from_single_file` loads, bit-exact round trips PyTorch -> JAX -> PyTorch, dtype casts, metadata,
atomic writes; and the config inverses (ours -> diffusers / transformers -> ours), including SDXL's
real configs."""

import gzip
import inspect
import json
import shutil
from pathlib import Path

import flax
import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sdxl_jax.convert import export
from sdxl_jax.convert import pipeline_weights as pw
from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.convert.single_file import LAYOUTS, diffusers_to_single_file
from sdxl_jax.convert.single_file_keys import ignorable_keys
from sdxl_jax.convert.text_encoder import (
    TEXT_MODEL_PREFIX,
    text_encoder_config_from_transformers,
    text_encoder_config_to_transformers,
    text_encoder_params_to_transformers,
)
from sdxl_jax.convert.unet import (
    stack_scanned_blocks,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_params_to_diffusers,
)
from sdxl_jax.convert.vae import _DIFFUSERS_DEFAULTS as VAE_DEFAULTS
from sdxl_jax.convert.vae import vae_config_from_diffusers, vae_config_to_diffusers, vae_params_to_diffusers
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig
from tests.helpers import tiny_pipeline
from tests.helpers.torch_reference import state_dict_numpy, to_nchw

FIXTURES = Path(__file__).parent / "fixtures"
PIPELINE_CLASSES = {"base": StableDiffusionXLPipeline, "refiner": StableDiffusionXLImg2ImgPipeline}
PROMPTS = ["a photo of a cat", "An astronaut riding a horse, 4k, highly detailed!", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{model: (diffusers pipeline, its save_pretrained folder)}."""
    root = tmp_path_factory.mktemp("export")
    pipes = {"base": tiny_pipeline.base_pipeline(), "refiner": tiny_pipeline.refiner_pipeline()}
    for model, pipe in pipes.items():
        pipe.save_pretrained(root / model, safe_serialization=True)
    return {model: (pipe, root / model) for model, pipe in pipes.items()}


@pytest.fixture(scope="module")
def loaded(saved):
    return {model: pw.load_diffusers(folder) for model, (_, folder) in saved.items()}


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    """{model: (export_diffusers' Written, export_single_file's Written)} of the loaded pipelines."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for model, weights in loaded.items():
        folder = export.export_diffusers(weights, root / model)
        out[model] = folder, export.export_single_file(weights, root / f"{model}.safetensors")
    return out


def canonical(component: str, state: dict) -> dict:
    """Text-encoder keys in the `text_model.`-prefixed form of the released files (what we write)."""
    if not component.startswith("text_encoder"):
        return state
    outside = (TEXT_MODEL_PREFIX, "text_projection.")
    return {(k if k.startswith(outside) else TEXT_MODEL_PREFIX + k): v for k, v in state.items()}


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert np.array_equal(got[key], value), key


def assert_same_modules(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---- configs ----------------------------------------------------------------------------------------


INVERSES = {
    "unet": (unet_config_from_diffusers, unet_config_to_diffusers),
    "vae": (vae_config_from_diffusers, vae_config_to_diffusers),
    "text_encoder": (text_encoder_config_from_transformers, text_encoder_config_to_transformers),
    "text_encoder_2": (text_encoder_config_from_transformers, text_encoder_config_to_transformers),
}
PRESETS = [
    ("unet", UNetConfig.sdxl_base()),
    ("unet", UNetConfig.sdxl_refiner()),
    ("unet", UNetConfig.tiny()),
    ("unet", UNetConfig.tiny(use_linear_projection=False, adm_in_channels=None)),
    ("vae", VAEConfig.sdxl()),
    ("vae", VAEConfig.tiny()),
    ("vae", VAEConfig.tiny(shift_factor=0.1, use_quant_conv=False)),
    ("text_encoder", CLIPTextConfig.clip_vit_l14()),
    ("text_encoder_2", CLIPTextConfig.openclip_vit_bigg14()),
    ("text_encoder", CLIPTextConfig.tiny()),
    ("text_encoder_2", CLIPTextConfig.tiny(eos_token_id=49407, projection_dim=8)),
]


@pytest.mark.parametrize("name, cfg", PRESETS)
def test_config_inverses_round_trip(name, cfg):
    from_torch, to_torch = INVERSES[name]
    assert from_torch(json.loads(json.dumps(to_torch(cfg)))) == cfg


def _diffusers_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("model", ["sdxl-base-1.0", "sdxl-refiner-1.0"])
def test_real_sdxl_configs_come_back(model):
    """ours -> diffusers of the real configs gives every key of the real config.json back; every key we
    add is one the class takes, at its default value."""
    real = json.loads((FIXTURES / "sdxl_diffusers_configs.json").read_text())[model]
    defaults = {
        "unet": _diffusers_defaults(UNet2DConditionModel),
        "vae": VAE_DEFAULTS,
        "text_encoder": transformers.CLIPTextConfig().to_dict(),
        "text_encoder_2": transformers.CLIPTextConfig().to_dict(),
    }
    for name in [c for c in INVERSES if c in real]:
        from_torch, to_torch = INVERSES[name]
        cfg = from_torch(real[name])
        ours = to_torch(cfg, sample_size=real[name]["sample_size"]) if name == "unet" else to_torch(cfg)
        assert {k: ours.get(k, "absent") for k in real[name]} == real[name], name
        added = {k: v for k, v in ours.items() if k not in real[name]}
        assert added.keys() <= defaults[name].keys(), name
        assert added == {k: defaults[name][k] for k in added}, name


def test_config_inverses_refuse_what_diffusers_cannot_express():
    with pytest.raises(ConversionError, match=r"transformer_norm_eps=1e-05 \(diffusers: 1e-06\)"):
        unet_config_to_diffusers(UNetConfig.tiny(transformer_norm_eps=1e-5))
    with pytest.raises(ConversionError, match=r"transformer_depth\[-1\]=3 != transformer_depth_middle=1"):
        unet_config_to_diffusers(UNetConfig.tiny(transformer_depth_middle=1))
    with pytest.raises(ConversionError, match=r"norm_eps=1e-05 \(diffusers: 1e-06\)"):
        vae_config_to_diffusers(VAEConfig.tiny(norm_eps=1e-5))


# ---- state dicts as views ----------------------------------------------------------------------------


def test_torch_states_are_the_converters_output_as_views(loaded):
    weights = loaded["base"]
    converters = {
        "unet": unet_params_to_diffusers, "vae": vae_params_to_diffusers,
        "text_encoder": text_encoder_params_to_transformers, "text_encoder_2": text_encoder_params_to_transformers,
    }  # fmt: skip
    for name, (cfg, params) in weights.components.items():
        state = export.torch_state(name, cfg, params, check=False)
        assert_same_tensors(state, converters[name](params, cfg))
        leaves = jax.tree_util.tree_leaves(params)
        assert all(any(np.shares_memory(v, x) for x in leaves) for v in state.values()), name  # nothing copied
    cfg, params = weights.components["unet"]
    scanned = export.torch_state("unet", cfg.replace(scan_layers=True), stack_scanned_blocks(params), check=False)
    assert_same_tensors(scanned, unet_params_to_diffusers(params, cfg))


def manifest(name: str) -> dict:
    with gzip.open(FIXTURES / f"{name}.json.gz", "rt") as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["base", "refiner"])
def test_full_size_exports_write_exactly_the_real_tensors(model):
    """From zero-stride placeholder params (nothing allocated): the diffusers states are the real diffusers
    files' tensors, and the single file is the real single file's, less its ignorable buffers."""
    layout = LAYOUTS[model]()
    components = {}
    for name in pw.MODEL_COMPONENTS[model]:
        cfg = getattr(layout, name)
        abstract = flax.linen.meta.unbox(pw.ABSTRACT_PARAMS[name](cfg))
        components[name] = cfg, jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)
    weights = pw.PipelineWeights(model, components)
    states = {name: export.torch_state(name, cfg, params) for name, (cfg, params) in components.items()}
    real = manifest(f"sdxl_{model}_diffusers_keys")["components"]
    for name, state in states.items():
        want = {k: tuple(v) for k, v in real[name]["tensors"].items() if not k.endswith("position_ids")}
        assert {k: v.shape for k, v in state.items()} == want, name
    single_file = diffusers_to_single_file(states, export.single_file_layout(weights))
    want = {k: tuple(v) for k, v in manifest(f"sdxl_{model}_single_file_keys")["tensors"].items()}
    assert {k: v.shape for k, v in single_file.items()} == {
        k: v for k, v in want.items() if k not in ignorable_keys(model)
    }


# ---- diffusers folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_diffusers_round_trip_is_bit_exact(saved, loaded, exported, model):
    """diffusers' save_pretrained -> load_diffusers -> export_diffusers: every tensor of every file back."""
    _, source = saved[model]
    weights, (written, _) = loaded[model], exported[model]
    assert written.parameters == weights.num_parameters() and written.bytes == weights.num_bytes()
    for name in pw.MODEL_COMPONENTS[model]:
        file = export.WEIGHTS_FILES[name]
        assert_same_tensors(load_file(written.path / name / file), canonical(name, load_file(source / name / file)))
        with safe_open(written.path / name / file, "np") as f:
            assert f.metadata() == {"format": "pt"}
    metadata = json.loads((written.path / export.METADATA_FILE).read_text())
    assert metadata["source"] == str(source) and metadata["source_format"] == "diffusers"
    assert metadata["model"] == model and metadata["dtype"] == "float32" and metadata["sdxl_jax_version"]


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_diffusers_loads_the_exported_folder(saved, exported, model):
    """from_pretrained gives the right pipeline, whose modules compute what the originals compute, and
    whose tokenizers and scheduler are the originals'."""
    pipe, _ = saved[model]
    again = PIPELINE_CLASSES[model].from_pretrained(exported[model][0].path, local_files_only=True)
    assert type(again) is type(pipe)
    assert again.config.force_zeros_for_empty_prompt == pipe.config.force_zeros_for_empty_prompt
    rng = np.random.default_rng(0)
    with torch.no_grad():
        x, z = (to_nchw(rng.standard_normal(shape, np.float32)) for shape in ((1, 8, 8, 4), (1, 6, 5, 4)))
        ctx = torch.from_numpy(rng.standard_normal((1, 77, pipe.unet.config.cross_attention_dim), np.float32))
        time_ids = [768.0, 1024, 0, 64, 1024, 1024][: 5 if model == "refiner" else 6]  # the refiner: aesthetic score
        cond = dict(text_embeds=torch.randn(1, tiny_pipeline.POOLED), time_ids=torch.tensor([time_ids]))
        unet_out = [p.unet(x, torch.tensor([500.0]), ctx, added_cond_kwargs=cond).sample for p in (again, pipe)]
        decoded = [p.vae.decode(z).sample for p in (again, pipe)]
    # Loaded and constructed modules hold bit-identical weights but torch's CPU kernels may take other
    # paths for them (allocation alignment): outputs agree to float rounding, the weights exactly.
    for component in ("unet", "vae"):
        theirs, ours = getattr(pipe, component).state_dict(), getattr(again, component).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert unet_out[0].abs().max() > 0.01 and decoded[0].abs().max() > 0.01
    torch.testing.assert_close(*unet_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(*decoded, rtol=0, atol=1e-5)
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if getattr(pipe, name) is None:
            assert getattr(again, name) is None and name not in ("text_encoder_2", "tokenizer_2")
        elif name.startswith("text_encoder"):
            assert type(getattr(again, name)) is type(getattr(pipe, name))
            assert_same_modules(getattr(again, name), getattr(pipe, name))
        else:
            tokenizer, reference = getattr(again, name), getattr(pipe, name)
            assert tokenizer.pad_token == reference.pad_token and tokenizer.model_max_length == 77
            want = reference(PROMPTS, padding="max_length", max_length=77).input_ids
            assert tokenizer(PROMPTS, padding="max_length", max_length=77).input_ids == want
    scheduler = again.scheduler
    assert type(scheduler) is type(pipe.scheduler)
    assert {k: scheduler.config[k] for k in tiny_pipeline.SCHEDULER} == tiny_pipeline.SCHEDULER


def test_dtype_casts_on_export(saved, loaded, tmp_path):
    pipe, _ = saved["refiner"]
    weights = loaded["refiner"]
    export.export_diffusers(weights, tmp_path / "fp16", dtype="fp16")
    got = load_file(tmp_path / "fp16" / "unet" / export.WEIGHTS_FILES["unet"])
    assert_same_tensors(got, {k: v.half().numpy() for k, v in pipe.unet.state_dict().items()})
    config = json.loads((tmp_path / "fp16" / "text_encoder_2" / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert json.loads((tmp_path / "fp16" / export.METADATA_FILE).read_text())["dtype"] == "float16"
    # fp16 params export as they are stored
    half = {name: (cfg.replace(param_dtype="float16"), jax.tree.map(lambda x: x.astype(np.float16), params))
            for name, (cfg, params) in weights.components.items()}  # fmt: skip
    export.export_single_file(pw.PipelineWeights("refiner", half), tmp_path / "fp16.safetensors")
    with safe_open(tmp_path / "fp16.safetensors", "pt") as f:
        assert f.metadata()["dtype"] == "float16"
        got = f.get_tensor("model.diffusion_model.out.2.weight")
    assert torch.equal(got, pipe.unet.conv_out.weight.detach().half())

    export.export_single_file(weights, tmp_path / "bf16.safetensors", dtype="bf16")
    with safe_open(tmp_path / "bf16.safetensors", "pt") as f:
        assert f.metadata()["dtype"] == "bfloat16"
        got = f.get_tensor("model.diffusion_model.out.2.weight")
    assert got.dtype == torch.bfloat16 and torch.equal(got, pipe.unet.conv_out.weight.detach().bfloat16())


# ---- single files --------------------------------------------------------------------------------------


def original_single_file(pipe, layout) -> dict[str, np.ndarray]:
    originals = {name: state_dict_numpy(getattr(pipe, name)) for name in layout.components}
    return diffusers_to_single_file(originals, layout)


def test_single_file_round_trip_is_bit_exact(saved, loaded, tmp_path):
    """single file -> load_single_file -> export_single_file gives every tensor back."""
    pipe, _ = saved["base"]
    layout = export.single_file_layout(loaded["base"])
    single_file = original_single_file(pipe, layout)
    save_file(single_file, tmp_path / "in.safetensors")  # safetensors' own writer
    weights = pw.load_single_file(tmp_path / "in.safetensors", dtype=None, layout=layout)
    written = export.export_single_file(weights, tmp_path / "out.safetensors")
    assert_same_tensors(load_file(tmp_path / "out.safetensors"), single_file)
    assert written.tensors == len(single_file) and written.parameters == weights.num_parameters()
    with safe_open(tmp_path / "out.safetensors", "np") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["source"] == str(tmp_path / "in.safetensors")
    assert (metadata["model"], metadata["dtype"], metadata["source_format"]) == ("base", "float32", "single-file")


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_single_file_from_a_diffusers_folder_is_the_originals(saved, loaded, exported, model):
    """diffusers folder -> load_diffusers -> export_single_file: the originals' single file, bit for bit."""
    pipe, _ = saved[model]
    want = original_single_file(pipe, export.single_file_layout(loaded[model]))
    assert_same_tensors(load_file(exported[model][1].path), want)


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_diffusers_from_single_file_loads_our_export(saved, exported, model, tmp_path):
    """The independent oracle: diffusers' own single-file loader, offline, with the configs of an exported
    folder (weights removed), gives back the original modules exactly."""
    pipe, _ = saved[model]
    folder, single_file = exported[model]
    shutil.copytree(folder.path, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    load = PIPELINE_CLASSES[model].from_single_file
    again = load(single_file.path, config=str(tmp_path / "configs"), local_files_only=True)
    for name in pw.MODEL_COMPONENTS[model]:
        assert_same_modules(getattr(again, name), getattr(pipe, name))


# ---- writing -------------------------------------------------------------------------------------------


def test_write_safetensors_streams_views_casts_and_is_read_by_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 4, 5), np.float32)
    tensors = {
        "transposed": base.transpose(2, 0, 1),  # a view: made contiguous as it is written
        "scalar": np.float32(2.5) * np.ones((), np.float32),
        "half": base[0].astype(np.float16),
        "bf16": base[1].astype(jax.numpy.bfloat16),
        "ids": np.arange(7, dtype=np.int64)[None],
    }
    seen = []
    on_tensor = lambda name, nbytes: seen.append((name, nbytes))
    nbytes = export.write_safetensors(tmp_path / "a.safetensors", tensors, {"k": "v"}, on_tensor=on_tensor)
    assert seen == [(k, v.nbytes) for k, v in tensors.items()] and nbytes == sum(b for _, b in seen)
    assert_same_tensors(load_file(tmp_path / "a.safetensors"), {k: np.array(v) for k, v in tensors.items()})
    header_size = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert header_size % 8 == 0 and (tmp_path / "a.safetensors").stat().st_size == 8 + header_size + nbytes

    export.write_safetensors(tmp_path / "b.safetensors", tensors, {}, dtype="fp16")
    got = load_file(tmp_path / "b.safetensors")
    assert {k: v.dtype.name for k, v in got.items()} == dict.fromkeys(tensors, "float16") | {"ids": "int64"}
    np.testing.assert_array_equal(got["transposed"], tensors["transposed"].astype(np.float16))
    with safe_open(tmp_path / "b.safetensors", "pt") as f:  # torch, the real consumer
        assert torch.equal(f.get_tensor("ids"), torch.arange(7)[None])


@pytest.mark.parametrize("to", ["diffusers", "single-file"])
def test_interrupted_or_refused_exports_leave_nothing(loaded, tmp_path, to):
    weights = loaded["refiner"]
    write = export.export_diffusers if to == "diffusers" else export.export_single_file
    events = []

    def interrupt(p):
        events.append(p)
        if p.tensors == 400:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(weights, tmp_path / "out.safetensors", progress=interrupt)
    assert list(tmp_path.iterdir()) == [] and len(events) == 400
    assert [p.tensors for p in events] == list(range(1, 401)) and events[0].component == "unet"
    assert all(p.total_tensors == events[0].total_tensors and p.bytes <= p.total_bytes for p in events)

    (tmp_path / "out.safetensors").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write(weights, tmp_path / "out.safetensors", progress=interrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_progress_reaches_the_totals_component_by_component(loaded, tmp_path):
    events = []
    written = export.export_single_file(loaded["base"], tmp_path / "a.safetensors", progress=events.append)
    assert len(events) == written.tensors
    last = events[-1]
    assert (last.tensors, last.bytes) == (last.total_tensors, last.total_bytes) == (written.tensors, written.bytes)
    order = list(dict.fromkeys(p.component for p in events))
    assert order == ["unet", "vae", "text_encoder", "text_encoder_2"]
