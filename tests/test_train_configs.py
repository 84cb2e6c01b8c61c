"""Every training config builds: the skeleton's entries are all there, the values pass `check`, the
models agree with each other, and (abstractly, nothing allocated) the sharded train state exists."""

import dataclasses
import importlib.util
import math
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import pytest

from sdxl_jax.data.buckets import bucket_table
from sdxl_jax.sharding import make_mesh, mesh_shape
from sdxl_jax.train import config as train_config
from sdxl_jax.train.data import DATA_SOURCES
from sdxl_jax.train.state import abstract_params, models_from_config, trainable_components
from sdxl_jax.train.step import StepSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING = {
    "tiny": ["", "refiner", "latents", "refiner,latents", "folder", "lora", "lora,refiner", "autoencoder"],
    "sdxl_pretrain_256": ["", "none", "full"],
    "sdxl_pretrain_512": [""],
    "sdxl_finetune_1024": ["", "minimal"],
    "sdxl_refiner": [""],
    "sdxl_lora_1024": ["", "te,bf16,conv,minimal"],
    "sdxl_vae": ["", "finetune", "decoder_only"],
    "demo_vae": ["", "gan"],
    "sdxl_turbo_add": ["teacher", "nfsd,teacher,minimal"],  # DINOv2's paths: test_add_features
}


def load(name: str, arg: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python train.py --config configs/" in module.__doc__  # the launch command is documented
    return module.get_config(arg or None)


def skeleton_keys(c: ml_collections.ConfigDict, prefix="") -> set[str]:
    keys = set()
    for key, value in c.items():
        if isinstance(value, ml_collections.ConfigDict) and key not in ("model", "data"):
            keys |= skeleton_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in TRAINING.items() for a in args])
def test_config_builds(name, arg):
    c = load(name, arg)
    train_config.check(c)
    models = models_from_config(c.model)
    reference = train_config.skeleton(models, c.data)
    assert skeleton_keys(c) == skeleton_keys(reference)  # nothing missing, nothing invented
    for key in ("num_steps", "batch_size", "seed", "log_every", "checkpoint_every", "mesh", "data"):
        assert key in c
    assert c.data.source in DATA_SOURCES
    if models.kind == "autoencoder":  # the VAE alone: images only, in buckets of its own factor
        assert c.objective == "autoencoder" and models.components == ("vae",)
        f = models.vae.downsample_factor
    else:
        f = models.vae.downsample_factor * models.unet.downsample_factor
    if c.data.source == "synthetic":
        if models.kind != "autoencoder":  # the text conditioning's widths
            assert c.data.context_dim == models.unet.context_dim
            assert c.data.pooled_dim == models.text_encoder_2.projection_dim
        buckets = c.data.buckets
    else:
        buckets = [(b.h, b.w) for b in bucket_table(c.data.buckets)]
    assert all(h % f == 0 and w % f == 0 for h, w in buckets), buckets
    if models.kind == "refiner":
        assert c.diffusion.t_max == 200 and models.text_encoder is None


def test_the_turbo_config_asks_for_its_dinov2_weights():
    c = load("sdxl_turbo_add", "nfsd")
    assert c.distillation.features == "dinov2" and c.distillation.weighting == "nfsd"
    with pytest.raises(ValueError, match="needs distillation.dinov2_path"):
        train_config.check(c)


@pytest.mark.parametrize(
    "name,arg,optimizer", [("tiny", "", "adamw"), ("tiny", "refiner", "adamw"), ("tiny", "", "muon")]
)
def test_tiny_state_is_laid_out_on_the_mesh(name, arg, optimizer):
    c = load(name, arg)
    c.train_text_encoders = True
    c.optimizer.name = optimizer
    spec = StepSpec.build(c, make_mesh(c.mesh))
    models, shardings, frozen = spec.models, spec.state_shardings, spec.frozen_shardings
    trainable = trainable_components(c, models)
    boxed = abstract_params(models)
    assert set(shardings.params) == {"unet", *(k for k in ("text_encoder", "text_encoder_2") if models.config(k))}
    assert set(frozen) == {"vae"}
    assert jax.tree.structure(shardings.params) == jax.tree.structure(shardings.ema_params)
    # the layout has the optimiser state's own tree (Muon's entries masked out for AdamW's params included)
    params = {k: v for k, v in nn.meta.unbox(boxed).items() if k in trainable}
    assert jax.tree.structure(shardings.opt_state) == jax.tree.structure(jax.eval_shape(spec.tx.init, params))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl_pretrain_256", "sdxl_finetune_1024", "sdxl_refiner"])
def test_full_size_state_shardings(name):
    """The whole abstract state of a full-size config: parameter and optimiser-state layouts."""
    c = load(name, "")
    spec = StepSpec.build(c, make_mesh(c.mesh))
    models, shardings, frozen = spec.models, spec.state_shardings, spec.frozen_shardings
    boxed = abstract_params(models)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(boxed["unet"])))
    assert n == {"base": 2_567_463_684, "refiner": 2_259_526_660}[models.kind]
    leaves = jax.tree.leaves(nn.meta.unbox(boxed["unet"]))
    kernel = max(leaves, key=lambda x: math.prod(x.shape))
    assert not jax.tree.leaves(shardings.params["unet"])[0].is_fully_replicated or len(jax.devices()) == 1
    assert kernel.dtype == jax.numpy.float32  # fp32 master weights
    assert set(frozen) == set(models.components) - {"unet"}


def test_bad_configs_fail_loudly():
    c = load("tiny", "")
    c.diffusion.weighting = "snr"
    c.mesh.data = -1
    with pytest.raises(ValueError, match="diffusion.weighting 'snr'.*\n.*mesh sizes"):
        train_config.check(c)
    assert mesh_shape(ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2}), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        mesh_shape(ml_collections.ConfigDict({"data": 3, "fsdp": -1, "tensor": 1}), 8)


def test_init_from_loads_weights_and_converts_the_layer_layout(tmp_path):
    import numpy as np

    from configs.tiny import tiny_models
    from sdxl_jax.convert import PipelineWeights, save_project
    from sdxl_jax.convert.unet import stack_scanned_blocks
    from sdxl_jax.train.state import load_params

    models = tiny_models(refiner=False)
    rng = np.random.default_rng(0)
    abstract = nn.meta.unbox(abstract_params(models))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    save_project(PipelineWeights("base", {n: (models.config(n), params[n]) for n in models.components}), tmp_path / "w")

    scanned = dataclasses.replace(models, unet=models.unet.replace(scan_layers=True))
    loaded = load_params(scanned, str(tmp_path / "w"))
    want = stack_scanned_blocks(params["unet"])
    assert jax.tree.structure(loaded["unet"]) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(loaded["unet"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        loaded["vae"]["encoder"]["conv_in"]["kernel"], params["vae"]["encoder"]["conv_in"]["kernel"]
    )

    # with shardings: each tensor placed as it is read (the scanned UNet read to numpy and restacked)
    whole = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.sharding.PartitionSpec())
    for config in (models, scanned):
        shardings = jax.tree.map(lambda _: whole, nn.meta.unbox(abstract_params(config)))
        placed = load_params(config, str(tmp_path / "w"), shardings)
        unet = stack_scanned_blocks(params["unet"]) if config.unet.scan_layers else params["unet"]
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(placed["vae"]))
        assert all(isinstance(x, jax.Array) != config.unet.scan_layers for x in jax.tree.leaves(placed["unet"]))
        for a, b in zip(jax.tree.leaves(placed["unet"]), jax.tree.leaves(unet), strict=True):
            np.testing.assert_array_equal(a, b)

    wider = dataclasses.replace(models, vae=models.vae.replace(block_out_channels=(8, 8, 16, 32)))
    with pytest.raises(ValueError, match="vae architecture differs"):
        load_params(wider, str(tmp_path / "w"))
    with pytest.raises(ValueError, match="vae architecture differs"):  # before any tensor is placed
        load_params(wider, str(tmp_path / "w"), jax.tree.map(lambda _: whole, nn.meta.unbox(abstract_params(models))))
    refiner = tiny_models(refiner=True)
    with pytest.raises(ValueError, match="holds an SDXL base, the config trains a refiner"):
        load_params(refiner, str(tmp_path / "w"))
