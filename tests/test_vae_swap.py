"""Another VAE in place of a checkpoint's (`Pipeline.load(vae=)`, sample.py --vae): a diffusers AutoencoderKL
folder (of another architecture with the same latent interface), a pipeline folder's `vae/`, and an
original-layout file (as Stability's `sdxl_vae.safetensors`, bare or under `first_stage_model.`) load to
exactly that VAE's parameters and decode as diffusers does; a VAE that does not fit fails in one line."""

import gzip
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import save_file

from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.convert.pipeline_weights import SINGLE_FILE_VAE_PREFIX, load_pipeline_weights, load_vae_for, swap_vae
from sdxl_jax.convert.single_file import vae_file_to_diffusers
from sdxl_jax.convert.single_file_keys import single_file_name, vae_names
from sdxl_jax.convert.vae import vae_config_from_diffusers, vae_params_from_diffusers
from sdxl_jax.models.pixel_space import PixelSpaceConfig, first_stage
from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.pipeline import Pipeline
from tests.helpers import tiny_pipeline
from tests.helpers.torch_reference import perturb_

FIXTURES = Path(__file__).parent / "fixtures"
DECODE_RTOL = 1e-5  # relative to the image's largest magnitude, fp32


def other_architecture_vae():
    """Narrower, one resnet per level, no mid attention: only the latent interface matches the pipeline's."""
    torch.manual_seed(3)
    model = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4,
        mid_block_add_attention=False, scaling_factor=0.13025, sample_size=32,
    )  # fmt: skip
    return perturb_(model, 3, scale=0.02)


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def original_layout(state: dict[str, np.ndarray], cfg: VAEConfig) -> dict[str, np.ndarray]:
    """A diffusers VAE state dict in ldm's layout (checked against diffusers' own single-file reader below)."""
    out = {}
    for key, value in state.items():
        name, kind, _ = single_file_name(vae_names(cfg), key)
        out[name] = value if kind == "copy" else value[:, :, None, None]  # the mid attention's 1x1 convs
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_swap")
    tiny_pipeline.base_pipeline().save_pretrained(root / "base")
    other = other_architecture_vae()
    other.save_pretrained(root / "other")  # a diffusers AutoencoderKL folder
    other.save_pretrained(root / "pipeline" / "vae")  # ... inside a pipeline folder
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    same = tiny_pipeline.vae(seed=7)  # the pipeline's architecture, other weights
    same.save_pretrained(root / "same")  # for diffusers' single-file reader (a file carries no config)
    ldm = original_layout(numpy_state(same), VAEConfig.tiny())
    save_file(ldm, root / "sdxl_vae.safetensors")
    unet_key = {"model.diffusion_model.conv_in.weight": np.zeros((2, 2), np.float32)}  # not the VAE's
    save_file({f"first_stage_model.{k}": v for k, v in ldm.items()} | unet_key, root / "whole.safetensors")
    return root


def expected_params(folder):
    """The Flax params of a diffusers AutoencoderKL folder, through the converter tested against diffusers."""
    model = AutoencoderKL.from_pretrained(folder)
    return vae_params_from_diffusers(numpy_state(model), vae_config_from_diffusers(dict(model.config)))


def assert_same_tree(got, want):
    got, want = jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def assert_decodes_as(cfg, params, torch_vae):
    z = np.random.default_rng(0).standard_normal((1, 4, 3, 4)).astype(np.float32)  # unscaled latent of a 32x24 image
    ours = jax.jit(lambda p, z: first_stage(cfg).apply({"params": p}, z, method="decode"))(params, z)
    with torch.no_grad():
        theirs = torch_vae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    scale = np.abs(theirs).max()
    assert scale > 0.05, "a flat image proves nothing"
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=DECODE_RTOL * scale)


@pytest.mark.parametrize("name", ["sdxl_vae.safetensors", "whole.safetensors"])
def test_the_original_layout_files_are_what_diffusers_reads(files, name):
    """The test's ldm-layout files are genuine: diffusers' own single-file reader gets the VAE back."""
    want = numpy_state(AutoencoderKL.from_pretrained(files / "same"))
    got = numpy_state(AutoencoderKL.from_single_file(str(files / name), config=str(files / "same")))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("source, folder", [("other", "other"), ("sdxl_vae.safetensors", "same")])
def test_pipeline_load_with_vae_uses_exactly_that_vae(files, source, folder):
    pipe = Pipeline.load(files / "base", dtype="fp32", vae=files / source)
    assert pipe.models.vae_cfg.latent_channels == 4 and pipe.models.vae_cfg.dtype == "float32"
    assert_same_tree(pipe.models.vae_params, expected_params(files / folder))
    if source == "other":
        assert pipe.models.vae_cfg.block_out_channels == (8, 16, 16, 32)
        torch_vae = AutoencoderKL.from_pretrained(files / "other")
    else:  # diffusers' model of that file
        torch_vae = AutoencoderKL.from_single_file(str(files / source), config=str(files / "same"))
    assert_decodes_as(pipe.models.vae_cfg, pipe.models.vae_params, torch_vae)


@pytest.mark.parametrize(
    "source, folder", [("pipeline", "other"), ("pipeline/vae", "other"), ("whole.safetensors", "same")]
)
def test_every_source_layout_reads_the_same_vae(files, source, folder):
    cfg, params = load_vae_for(files / source, VAEConfig.tiny())
    assert_same_tree(params, expected_params(files / folder))
    base = load_pipeline_weights(files / "base")
    swapped = swap_vae(base, files / source)
    assert swapped.params("vae") is not base.params("vae") and swapped.metadata["vae"] == str(files / source)
    assert_same_tree(swapped.params("vae"), params)


def write_config(files, folder, **changes):
    """A VAE folder holding only a config.json: the other VAE's, changed (the check comes before any weights)."""
    folder.mkdir(parents=True)
    config = dict(AutoencoderKL.load_config(files / "other")) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda f, d: write_config(f, d / "c16", latent_channels=16), r"latent_channels 16 \(the model's VAE: 4\)"),
        (
            lambda f, d: write_config(f, d / "sd15", scaling_factor=0.18215, shift_factor=0.1),
            r"scaling_factor 0.18215 \(the model's VAE: 0.13025\); shift_factor 0.1 \(the model's VAE: None\)",
        ),
        (
            lambda f, d: write_config(
                f,
                d / "f4",
                block_out_channels=[8, 16, 32],
                down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3,
            ),  # fmt: skip
            r"downsample_factor 4 \(the model's VAE: 8\)",
        ),
        ("c16.safetensors", r"latent_channels 16 \(the model's VAE: 4\)"),
        ("f4.safetensors", r"downsample_factor 4 \(the model's VAE: 8\)"),
        ("notes.safetensors", r"not a VAE in the original layout \(no decoder.conv_in.weight"),
        (lambda f, d: f / "base" / "tokenizer", "neither a diffusers AutoencoderKL folder"),
        (lambda f, d: f / "base" / "unet", "not an AutoencoderKL config: _class_name='UNet2DConditionModel'"),
    ],
)
def test_a_vae_that_does_not_fit_fails_in_one_line(files, tmp_path, make, message):
    ldm = original_layout(numpy_state(AutoencoderKL.from_pretrained(files / "same")), VAEConfig.tiny())
    if make == "c16.safetensors":
        save_file(ldm | {"decoder.conv_in.weight": np.zeros((64, 16, 3, 3), np.float32)}, tmp_path / make)
    elif make == "f4.safetensors":
        save_file({k: v for k, v in ldm.items() if not k.startswith("encoder.down.3.")}, tmp_path / make)
    elif make == "notes.safetensors":
        save_file({"notes": np.zeros(3, np.float32)}, tmp_path / make)
    path = tmp_path / make if isinstance(make, str) else make(files, tmp_path)
    with pytest.raises(ConversionError, match=message) as e:
        load_vae_for(path, VAEConfig.tiny())
    assert "\n" not in str(e.value)


def test_pixel_space_models_and_project_checkpoints_are_refused(files, tmp_path):
    with pytest.raises(ConversionError, match="works in pixel space; it has no VAE to replace") as e:
        load_vae_for(files / "other", PixelSpaceConfig())
    assert "\n" not in str(e.value)
    (tmp_path / "sdxl_jax.json").write_text("{}")
    with pytest.raises(ConversionError, match="holds a whole pipeline"):
        load_vae_for(tmp_path, VAEConfig.tiny())
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_vae_for(tmp_path / "nothing", VAEConfig.tiny())


def test_pipeline_load_refuses_a_vae_that_does_not_fit(files, tmp_path):
    folder = write_config(files, tmp_path / "sd15", scaling_factor=0.18215)
    with pytest.raises(ConversionError, match=r"^the VAE .*sd15 does not fit the model: scaling_factor 0.18215"):
        Pipeline.load(files / "base", dtype="fp32", vae=folder)


def test_original_layout_files_are_read_strictly(files, tmp_path):
    ldm = dict(original_layout(numpy_state(AutoencoderKL.from_pretrained(files / "same")), VAEConfig.tiny()))
    del ldm["decoder.mid.attn_1.q.weight"]
    ldm["loss.logvar"] = np.zeros((), np.float32)
    ldm["decoder.conv_out.bias"] = np.zeros(4, np.float32)
    save_file(ldm, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        load_vae_for(tmp_path / "bad.safetensors", VAEConfig.tiny())
    message = str(e.value)
    assert "the VAE file does not match the model's VAE" in message
    assert "missing (1):\n    decoder.mid.attn_1.q.weight" in message
    assert "unexpected (1):\n    loss.logvar" in message
    assert "decoder.conv_out.bias: (4,), expected (3,) (for vae decoder.conv_out.bias)" in message


class ManifestShapes(dict):
    """A state dict's key -> shape, as a key manifest records it (nothing to read)."""

    def shape(self, key):
        return tuple(self[key])


def test_the_real_sdxl_vae_keys_convert_bare_and_inside_a_single_file():
    """Stability's sdxl_vae.safetensors names (the base single file's `first_stage_model.` tensors, prefix
    dropped) and the whole file both give every tensor of the full-size VAE, shapes checked."""
    with gzip.open(FIXTURES / "sdxl_base_single_file_keys.json.gz") as f:
        tensors = json.load(f)["tensors"]
    whole = ManifestShapes(tensors)
    prefix = SINGLE_FILE_VAE_PREFIX
    bare = ManifestShapes({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    assert len(bare) == 248
    for state, p in ((bare, ""), (whole, prefix)):
        diffusers_state = vae_file_to_diffusers(state, VAEConfig.sdxl(), p)
        assert len(diffusers_state) == 248
        assert diffusers_state.shape("decoder.mid_block.attentions.0.to_q.weight") == (512, 512)


def test_the_sampling_configs_have_no_vae_by_default():
    from configs import demo, sdxl_base

    assert sdxl_base.get_config().vae == "" and demo.get_config().sample.vae == ""


@pytest.mark.slow  # a sample.py process; Pipeline.load(vae=) is tested by default above
def test_sample_py_takes_a_vae_and_records_it_in_the_png(files, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers.processes import child_env
    from tests.helpers.train import REPO

    cmd = [sys.executable, "sample.py", "--config", "configs/sdxl_base.py", f"--config.checkpoint={files / 'base'}",
           "--prompt", "a cat", "--steps", "1", "--width", "64", "--height", "64", "--config.dtype=fp32",
           "--vae", str(files / "pipeline" / "vae"), "--outdir", str(tmp_path / "out"),
           "--config.compilation_cache=none"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"+ VAE {files / 'pipeline' / 'vae'} in" in result.stdout
    info = Image.open(tmp_path / "out" / "00000000.png").text["parameters"].splitlines()[-1]
    assert ", Model: base, VAE: pipeline/vae, Version: " in info

    cmd[cmd.index("--vae") + 1] = str(files / "base" / "unet")
    bad = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "not an AutoencoderKL config: _class_name='UNet2DConditionModel'" in bad.stderr
