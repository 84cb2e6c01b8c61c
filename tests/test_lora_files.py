"""LoRA files made by PEFT and saved by diffusers (its own format and kohya's, SDXL's sgm names too) merge
here into the same weights diffusers gets when it loads and fuses them; bad files fail in one line."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from sdxl_jax.convert import load_pipeline_weights
from sdxl_jax.convert.lora import merge_loras, module_table, modules
from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.convert.text_encoder import text_encoder_params_to_transformers
from sdxl_jax.convert.unet import unet_params_to_diffusers
from tests.helpers import tiny_pipeline

UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
    "conv_shortcut",
]  # fmt: skip  (LoCon's too)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SCALE = 0.8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny base pipeline as a diffusers folder, and a LoRA on all three models (rank 4, alpha 8,
    random up and down) in diffusers' format (with its adapter metadata) and in kohya's."""
    root = tmp_path_factory.mktemp("lora")
    pipe = tiny_pipeline.base_pipeline()
    pipe.save_pretrained(root / "base", safe_serialization=True)
    torch.manual_seed(0)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False),
        "text_encoder": LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS, init_lora_weights=False),
        "text_encoder_2": LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_TARGETS, init_lora_weights=False),
    }
    layers = {}
    for name, config in configs.items():
        getattr(pipe, name).add_adapter(config)
        layers[name] = get_peft_model_state_dict(getattr(pipe, name))
    StableDiffusionXLPipeline.save_lora_weights(
        root / "diffusers", unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )  # fmt: skip
    peft_keys = {f"{p}.{k}": v for p in layers for k, v in layers[p].items()}
    kohya = convert_state_dict_to_kohya(peft_keys)  # diffusers-named kohya keys, alpha = rank
    save_file({k: v.numpy() for k, v in kohya.items()}, root / "kohya.safetensors")
    return root


def diffusers_fused(folder, lora) -> dict:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()  # the fused weights stay
    return {name: {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()} for name in UNITS}


UNITS = ("unet", "text_encoder", "text_encoder_2")


def ours_merged(folder, lora) -> dict:
    weights = merge_loras(load_pipeline_weights(folder), [(lora, SCALE)])
    return {
        "unet": unet_params_to_diffusers(weights.params("unet"), weights.config("unet")),
        "text_encoder": text_encoder_params_to_transformers(
            weights.params("text_encoder"), weights.config("text_encoder")
        ),
        "text_encoder_2": text_encoder_params_to_transformers(
            weights.params("text_encoder_2"), weights.config("text_encoder_2")
        ),
    }


def assert_same_weights(ours, theirs, base):
    changed = 0
    for name in UNITS:
        for key, want in theirs[name].items():
            if key not in ours[name]:
                continue  # position ids and the like
            np.testing.assert_allclose(ours[name][key], want, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
            changed += not np.array_equal(want, base[name][key])
    assert changed > 100  # the LoRA did change the weights


@pytest.fixture(scope="module")
def base(files):
    pipe = StableDiffusionXLPipeline.from_pretrained(files / "base", torch_dtype=torch.float32)
    return {name: {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()} for name in UNITS}


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_lora_merges_into_the_weights_diffusers_fuses(files, base, fmt):
    lora = (
        files / "diffusers" / "pytorch_lora_weights.safetensors" if fmt == "diffusers" else files / "kohya.safetensors"
    )
    assert_same_weights(ours_merged(files / "base", lora), diffusers_fused(files / "base", lora), base)


def test_kohya_sgm_names_as_sd_scripts_writes_them(files, base, tmp_path):
    """kohya's SDXL LoRAs name UNet modules by the original (sgm) layout; diffusers maps them itself."""
    weights = load_pipeline_weights(files / "base")
    to_sgm = {m.aliases[0]: m.kohya for m in modules(weights) if m.component == "unet"}  # diffusers- -> sgm-named
    renamed = {}
    for key, value in load_file(files / "kohya.safetensors").items():
        module, _, suffix = key.partition(".")
        renamed[f"{to_sgm.get(module, module)}.{suffix}"] = value
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    assert any(k.startswith("lora_unet_output_blocks_") for k in renamed)
    save_file(renamed, tmp_path / "sgm.safetensors")
    lora = tmp_path / "sgm.safetensors"
    assert_same_weights(ours_merged(files / "base", lora), diffusers_fused(files / "base", lora), base)


def test_bad_lora_files_fail_in_one_line(files, tmp_path):
    weights = load_pipeline_weights(files / "base")
    good = load_file(files / "kohya.safetensors")
    save_file(
        good | {"lora_unet_no_such_module.lora_down.weight": np.zeros((4, 8), np.float32)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(ConversionError, match=r"1 tensors name no module of this SDXL model, e.g. lora_unet_no_such"):
        merge_loras(weights, [(tmp_path / "x.safetensors", 1.0)])
    merge_loras(weights, [(tmp_path / "x.safetensors", 1.0)], strict=False)  # skipped, with a warning
    key = next(k for k in good if k.endswith("lora_down.weight"))
    save_file(good | {key: np.zeros((4, 3), np.float32)}, tmp_path / "shape.safetensors")
    with pytest.raises(ConversionError, match="do not fit the weight"):
        merge_loras(weights, [(tmp_path / "shape.safetensors", 1.0)])
    (tmp_path / "cut.safetensors").write_bytes((files / "kohya.safetensors").read_bytes()[:100])
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        merge_loras(weights, [(tmp_path / "cut.safetensors", 1.0)])


@pytest.mark.slow  # the weights are compared in the default run; this adds the sampler and the VAE
def test_images_with_a_lora_match_diffusers_with_it_fused(files):
    """`Pipeline.load(..., loras=[(file, 0.8)])` generates what diffusers does with the LoRA fused at 0.8."""
    from sdxl_jax.pipeline import Pipeline
    from tests.test_pipeline import PROMPTS, H, W, assert_images_close, diffusers_uint8, initial_noise, nchw

    lora = files / "kohya.safetensors"
    theirs = StableDiffusionXLPipeline.from_pretrained(files / "base", torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, height=H, width=W, num_inference_steps=4, guidance_scale=5.0)
    noise = initial_noise(len(PROMPTS))
    with torch.no_grad():
        plain = diffusers_uint8(theirs(**kw, latents=nchw(noise), output_type="np").images)
        theirs.load_lora_weights(str(lora))
        theirs.fuse_lora(lora_scale=SCALE)
        want = diffusers_uint8(theirs(**kw, latents=nchw(noise), output_type="np").images)
    ours = Pipeline.load(files / "base", dtype="fp32", loras=[(str(lora), SCALE)])
    images = ours.generate(PROMPTS, height=H, width=W, steps=4, guidance_scale=5.0, latents=noise)
    assert np.abs(want.astype(int) - plain.astype(int)).mean() > 1  # the LoRA changes the images
    assert_images_close(images, want)


@pytest.mark.slow  # a sample.py process (~30 s); the loader it calls is tested by default above
def test_sample_py_takes_loras_and_records_them_in_the_png(files, tmp_path):
    """`sample.py --lora PATH:SCALE` loads with the LoRA and records `<lora:NAME:SCALE>` in the PNG."""
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers.processes import child_env
    from tests.helpers.train import REPO

    lora = files / "kohya.safetensors"
    cmd = [sys.executable, "sample.py", "--config", "configs/sdxl_base.py", f"--config.checkpoint={files / 'base'}",
           "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--lora", f"{lora}:0.5",
           "--outdir", str(tmp_path / "out"), "--config.compilation_cache=none"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"+ LoRA {lora} x 0.5" in result.stdout
    assert Image.open(tmp_path / "out" / "00000000.png").text["parameters"].startswith("a cat <lora:kohya:0.5>\n")


def test_sdxl_convert_bakes_loras_into_an_export(files, tmp_path):
    """`sdxl-convert --lora` writes the weights `merge_loras` makes; a bad LoRA is an error, nothing written."""
    from sdxl_jax.convert.cli import main as convert_main

    lora = files / "kohya.safetensors"
    assert convert_main([str(files / "base"), str(tmp_path / "baked"), "--lora", f"{lora}:0.5"]) == 0
    baked = load_pipeline_weights(tmp_path / "baked")
    merged = merge_loras(load_pipeline_weights(files / "base"), [(lora, 0.5)])
    for name in UNITS:
        for a, b in zip(jax.tree.leaves(baked.params(name)), jax.tree.leaves(merged.params(name)), strict=True):
            np.testing.assert_array_equal(a, b)
    assert baked.metadata["loras"] == "kohya.safetensors:0.5"
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_nothing.lora_up.weight": np.zeros((4, 4), np.float32)}, bad)
    assert convert_main([str(files / "base"), str(tmp_path / "never"), "--lora", str(bad)]) == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # test budget: run before resolving, not in the default run
def test_full_size_kohya_names_map_one_to_one_onto_sdxl_base():
    """From the real base's key manifest (no weights): kohya's default (transformer) targets, 722 UNet
    modules in sgm names, 72 CLIP-L and 192 bigG modules, map onto distinct parameters, and every name
    the table gives for those targets is in the manifest."""
    import gzip
    import re
    from pathlib import Path

    from sdxl_jax.convert.pipeline_weights import PipelineWeights
    from sdxl_jax.convert.single_file import LAYOUTS

    manifest = Path(__file__).parent / "fixtures" / "sdxl_base_single_file_keys.json.gz"
    tensors = json.loads(gzip.open(manifest).read())["tensors"]
    layout = LAYOUTS["base"]()
    table = module_table(PipelineWeights("base", {c: (getattr(layout, c), {}) for c in layout.components}))
    transformer = re.compile(r"model\.diffusion_model\.(.*\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                             r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))))\.weight")  # fmt: skip
    unet = {"lora_unet_" + m.group(1).replace(".", "_") for key in tensors if (m := transformer.fullmatch(key))}
    clip_l = re.compile(r"conditioner\.embedders\.0\.transformer\.(text_model\.encoder\.layers\.\d+\."
                        r"(self_attn\.[qkvo]\w*_proj|mlp\.fc[12]))\.weight")  # fmt: skip
    te1 = {"lora_te1_" + m.group(1).replace(".", "_") for key in tensors if (m := clip_l.fullmatch(key))}
    layers = {
        int(m.group(1))
        for key in tensors
        if (m := re.match(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.", key))
    }
    parts = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    te2 = {f"lora_te2_text_model_encoder_layers_{i}_{p}" for i in layers for p in parts}
    assert (len(unet), len(te1), len(te2)) == (722, 72, 192)
    for names in (unet, te1, te2):
        assert names <= table.keys()
        assert len({table[n][:2] for n in names}) == len(names)  # distinct parameters
    target = re.compile(r"(attn[12]_to_(q|k|v|out_0)|ff_net_(0_proj|2)|proj_(in|out))$")
    ours = {n for n in table if n.startswith("lora_unet_") and target.search(n)}
    sgm_named = {n for n in ours if not n.startswith(("lora_unet_down_", "lora_unet_up_", "lora_unet_mid_"))}
    assert sgm_named == unet  # and nothing the manifest lacks
    assert {table[n][2] for n in unet} == {table[n][2] for n in ours}  # the diffusers spellings: the same modules


@pytest.mark.slow  # test budget: run before resolving, not in the default run
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_trained_adapters_saved_as_a_file_merge_here_and_in_diffusers_alike(files, base, fmt, tmp_path):
    """Adapters in this project's layout (`train.lora`, LoCon targets: 3x3 convs at their own rank),
    written by `save_lora`, give the weights `train.lora.merged` computes, here and in diffusers."""
    import flax

    from sdxl_jax.convert.lora import save_lora, target_kernels
    from sdxl_jax.train.lora import LoraSpec, init_adapters, merged

    weights = load_pipeline_weights(files / "base")
    spec = LoraSpec(rank=4, alpha=2.0, targets="conv", conv_rank=2, conv_alpha=3.0)
    kernels = target_kernels(weights, spec)
    adapters = init_adapters(jax.random.key(0), kernels, spec)
    rng = np.random.default_rng(1)
    adapters = {
        k: {"down": v["down"], "up": rng.normal(0, 0.2, v["up"].shape).astype(np.float32)} for k, v in adapters.items()
    }
    assert {a["down"].shape[-1] for a in adapters.values()} == {2, 4}  # conv_rank on 3x3 kernels
    want = merged(kernels, adapters, spec, scale=SCALE)
    path = tmp_path / "lora.safetensors"
    save_lora(adapters, spec, weights, path, fmt)
    ours = merge_loras(weights, [(path, SCALE)])
    for name, value in want.items():
        component, *where = name.split("/")
        got = flax.traverse_util.flatten_dict(ours.params(component))[tuple(where)]
        np.testing.assert_allclose(got, np.asarray(value), rtol=1e-5, atol=1e-6, err_msg=name)
    assert_same_weights(ours_merged(files / "base", path), diffusers_fused(files / "base", path), base)


def test_adapters_start_at_the_base_model_with_kohyas_initialisation():
    from sdxl_jax.train.lora import LoraSpec, init_adapters, merged

    spec = LoraSpec(rank=8, alpha=4.0, targets="conv", conv_rank=2, conv_alpha=1.0)
    kernels = {
        "dense": jax.numpy.ones((64, 16)),
        "conv": jax.numpy.ones((3, 3, 32, 16)),
        "pointwise": jax.numpy.ones((1, 1, 32, 16)),
    }
    adapters = init_adapters(jax.random.key(0), kernels, spec)
    assert {k: a["down"].shape for k, a in adapters.items()} == {
        "dense": (64, 8),
        "conv": (3, 3, 32, 2),
        "pointwise": (1, 1, 32, 8),
    }
    for name, a in adapters.items():
        bound = 1 / np.sqrt(np.prod(kernels[name].shape[:-1]))  # kaiming-uniform(a=sqrt 5): U(+-1/sqrt(fan_in))
        assert np.abs(a["down"]).max() <= bound and np.abs(a["down"]).max() > 0.9 * bound
        assert not np.asarray(a["up"]).any()
    for name, w in merged(kernels, adapters, spec).items():
        np.testing.assert_array_equal(w, kernels[name])  # zero up: the base model, exactly
    with pytest.raises(ValueError, match="lora targets 'all' is not one of"):
        LoraSpec(targets="all")


def test_a_lora_merges_into_a_scanned_unet_as_into_an_unscanned_one(files):
    """Exports of runs trained with scan_layers=True keep the stacked blocks; LoRAs still merge."""
    from sdxl_jax.convert.pipeline_weights import PipelineWeights
    from sdxl_jax.convert.unet import stack_scanned_blocks

    weights = load_pipeline_weights(files / "base")
    cfg, params = weights.components["unet"]
    scanned = PipelineWeights(
        weights.model, weights.components | {"unet": (cfg.replace(scan_layers=True), stack_scanned_blocks(params))}
    )
    lora = files / "kohya.safetensors"
    want = stack_scanned_blocks(merge_loras(weights, [(lora, SCALE)]).params("unet"))
    got = merge_loras(scanned, [(lora, SCALE)])
    assert got.metadata["loras"] == f"kohya.safetensors:{SCALE:g}"
    for a, b in zip(jax.tree.leaves(got.params("unet")), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
