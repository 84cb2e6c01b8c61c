"""The ADD discriminator's DINOv2 feature network (`train/add_features.py`) against torch and
transformers: the area resize is `F.interpolate(mode="area")`; the heads' inputs and the image embedding
from decoded images are StyleGAN-T's preprocessing + `Dinov2Model` hidden states with the CLS token
added (fp32, perturbed random weights in a `save_pretrained` folder); the ADD step with DINOv2 traced
abstractly; (slow) a tiny ADD run with DINOv2 features and image conditioning."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from sdxl_jax.models.dinov2 import Dinov2Config
from sdxl_jax.train.add_features import Dinov2Features, area_matrix, feature_network
from tests.helpers.torch_reference import assert_parity, perturb_, to_nchw
from tests.helpers.train import tiny_config

SIZE = 20  # the tiny networks' 4-pixel patches: a 5x5 grid, not the trained 7x7 (the table is resampled)
S_TINY = Dinov2Config.tiny(num_layers=4, layerscale_value=0.5)  # 4 layers: heads on hidden states 0 ... 4
L_TINY = Dinov2Config.tiny(hidden_size=24, num_heads=3, num_layers=2)


def _reference(cfg: Dinov2Config, seed: int) -> transformers.Dinov2Model:
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, layerscale_value=cfg.layerscale_value,
    )  # fmt: skip
    return perturb_(transformers.Dinov2Model(config), seed=seed).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(ViT-S stand-in folder, ViT-L stand-in folder, their torch models), written by `save_pretrained`."""
    root = tmp_path_factory.mktemp("dinov2")
    small, large = _reference(S_TINY, 1), _reference(L_TINY, 2)
    small.save_pretrained(root / "s")
    large.save_pretrained(root / "l")
    return str(root / "s"), str(root / "l"), small, large


def _dinov2_overrides(folders) -> dict:
    return {"distillation.features": "dinov2", "distillation.dinov2_path": folders[0],
            "distillation.dinov2_image_path": folders[1], "distillation.dinov2_size": SIZE}  # fmt: skip


@pytest.mark.parametrize("size, out", [(64, 28), (512, 224), (30, 7), (5, 5), (7, 12)])
def test_area_resize_is_torch_area(size, out):
    x = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=(out, out), mode="area").numpy()
    m = area_matrix(size, out)
    np.testing.assert_allclose(m @ x @ m.T, want, rtol=1e-6, atol=1e-6)


def test_heads_inputs_and_image_embedding_are_transformers(folders):
    """From decoded images in [-1, 1]: [0, 1], area resize, ImageNet normalisation, then ViT-S's hidden
    states 0 ... 4 with CLS added to each patch token; ViT-L's pooled CLS for the image, zero where the
    student's input was pure noise."""
    network = feature_network(tiny_config("add", _dinov2_overrides(folders)))
    assert isinstance(network, Dinov2Features) and network.image_embed_dim == L_TINY.hidden_size
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    frozen = network.frozen_params(jax.tree.map(lambda _: one_device, nn.meta.unbox(network.abstract_frozen())))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)

    x = F.interpolate(to_nchw((images + 1) / 2), size=(SIZE, SIZE), mode="area")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    x = (x - mean) / std
    with torch.no_grad():
        hidden = folders[2](pixel_values=x, output_hidden_states=True).hidden_states
        pooled = folders[3](pixel_values=x).pooler_output.numpy()
    ours = network.features(frozen, None, jnp.asarray(images), None, None)
    assert len(ours) == 5
    for k, h in enumerate(hidden):
        assert_parity(ours[k], (h[:, 1:] + h[:, :1]).numpy(), name=f"head {k}")
    pure = jnp.array([False, True, False, True])
    embed = np.asarray(network.image_embed(frozen, jnp.asarray(images), pure))
    assert_parity(embed[[0, 2]], pooled[[0, 2]], name="image embedding")
    np.testing.assert_array_equal(embed[[1, 3]], 0.0)


def test_the_dinov2_step_traces_with_its_networks(folders):
    """The tiny ADD step with DINOv2 features, traced abstractly: `frozen` holds both networks (the
    folders' architectures, fp32), the heads read 5 hidden states and the image embedding."""
    from sdxl_jax.train.memory_plan import abstract_step
    from sdxl_jax.train.step import train_step

    config = tiny_config("add", _dinov2_overrides(folders))
    spec, (state, frozen, batch) = abstract_step(config, {"data": 1, "fsdp": 1, "tensor": 1}, 8, 32, 32, False,
                                                 jax.devices()[:1])  # fmt: skip
    assert set(frozen) >= {"teacher", "dinov2", "dinov2_image"}
    layers = {k for k in nn.meta.unbox(frozen["dinov2"]) if k.startswith("layers_")}
    assert len(layers) == 4 and set(state.discriminator.params) == {f"head_{k}" for k in range(5)}
    assert spec.objective.discriminator.image_embed_dim == L_TINY.hidden_size
    new, metrics = jax.eval_shape(functools.partial(train_step, spec=spec), state, frozen, batch)
    assert {"g_loss", "d_loss", "r1", "d_accuracy_real", "d_accuracy_fake"} <= set(metrics)


def test_dinov2_configs_are_checked():
    from sdxl_jax.train.config import check

    with pytest.raises(ValueError, match="needs distillation.dinov2_path"):
        check(tiny_config("add", {"distillation.features": "dinov2"}))
    with pytest.raises(FileNotFoundError):
        feature_network(tiny_config("add", {"distillation.features": "dinov2", "distillation.dinov2_path": "/nope"}))


def test_a_dinov2_size_off_the_patch_grid_is_refused(folders):
    with pytest.raises(ValueError, match="not a multiple"):
        feature_network(tiny_config("add", _dinov2_overrides(folders) | {"distillation.dinov2_size": 22}))


@pytest.mark.slow
def test_a_tiny_add_run_with_dinov2(folders, tmp_path):
    """2 steps with DINOv2 features: the heads move, every metric is finite; with the distillation term
    off the student still gets a gradient, which can only come through DINOv2 on its decoded pixels."""
    from sdxl_jax.sharding import make_mesh
    from sdxl_jax.train.loop import train
    from sdxl_jax.train.state import create_sharded_state
    from sdxl_jax.train.step import StepSpec

    run = _dinov2_overrides(folders) | {"num_steps": 2, "validation.every": 0, "export_on_finish": "none",
                                        "checkpoint_every": 100}  # fmt: skip
    config = tiny_config("add", run)
    born, _ = create_sharded_state(StepSpec.build(config, make_mesh(config.mesh)))
    state = train(config, tmp_path / "run")
    assert int(state.step) == 2 and len(state.discriminator.params) == 5
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.discriminator.params, born.discriminator.params)
    assert all(moved[f"head_{k}"]["cls"]["kernel"] for k in range(5))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "distill_loss", "g_loss", "d_loss", "r1", "d_accuracy_real", "d_accuracy_fake")
    assert all(np.isfinite(r[k]) for r in rows for k in keys) and all(r["r1"] > 0 for r in rows)

    train(tiny_config("add", run | {"distillation.distill_weight": 0.0}), tmp_path / "adversarial_only")
    rows = [json.loads(line) for line in (tmp_path / "adversarial_only" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)
