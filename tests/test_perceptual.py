"""The first stage's training losses against their PyTorch references (CPU, fp32, weights copied across):
LPIPS against the `lpips` package (random VGG16, the package's real heads), the PatchGAN discriminator
against taming's `NLayerDiscriminator` in train and eval mode (running averages after a step included),
its initialisation, and strict conversion of both.

The oracles are test-only, installed with `pip install --no-deps lpips taming-transformers`. taming is
used through `taming.modules.discriminator.model` alone, which needs only torch. `import lpips` needs
torchvision's `models.vgg16`, which `tests.helpers.torch_reference.torchvision_stand_in` provides where
torchvision does not load.
"""

import functools
import importlib
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdxl_jax.convert import ConversionError, load_lpips, load_patch_discriminator, patch_discriminator_to_torch
from sdxl_jax.convert.files import open_state_dict
from sdxl_jax.convert.perceptual import VGG16_CLASSIFIER_KEYS, lpips_params_from_torch
from sdxl_jax.models.lpips import STAGES, Lpips, unit_normalize
from sdxl_jax.models.patchgan import PatchDiscriminator, PatchDiscriminatorConfig, discriminator_param_count
from tests.helpers.torch_reference import assert_parity, from_nchw, state_dict_numpy, to_nchw, torchvision_stand_in


@functools.cache
def _lpips_package():
    if importlib.util.find_spec("lpips") is None:
        return None
    with torchvision_stand_in():  # lpips keeps its own reference to what it imported
        return importlib.import_module("lpips")


def lpips_package():
    package = _lpips_package()
    if package is None:
        pytest.skip("lpips not installed: pip install --no-deps lpips")
    return package


def taming_discriminator():
    return pytest.importorskip("taming.modules.discriminator.model", reason="pip install --no-deps taming-transformers")


def heads_path() -> Path:
    return Path(lpips_package().__file__).parent / "weights" / "v0.1" / "vgg.pth"


@functools.cache
def lpips_reference():
    """lpips' LPIPS with a random VGG16 and the package's heads; its trunk's state dict in torchvision's
    names (lpips' slices keep torchvision's `features` indices). The trunk's kernels are He-normal, so
    that the features keep their scale through 13 ReLU layers, and its biases nonzero."""
    torch.manual_seed(0)
    model = lpips_package().LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, (2 / p[0].numel()) ** 0.5)
    vgg16 = {
        f"features.{key.split('.', 2)[2]}": value
        for key, value in state_dict_numpy(model).items()
        if key.startswith("net.slice")
    }
    return model.eval(), vgg16


@functools.cache
def image_pairs(shape=(3, 32, 32, 3)):
    """Pairs of images in [-1, 1]: two that differ, and a last that is one image twice."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(shape), -1, 1).astype(np.float32)
    y[-1] = x[-1]
    return x, y


lpips_with_terms = jax.jit(functools.partial(Lpips().apply, stages=True))


def test_lpips_matches_the_lpips_package(tmp_path):
    model, vgg16 = lpips_reference()
    classifier = {key: np.zeros(2, np.float32) for key in VGG16_CLASSIFIER_KEYS}  # ignored by name
    torch.save({k: torch.from_numpy(v) for k, v in (vgg16 | classifier).items()}, tmp_path / "vgg16.pth")
    params = load_lpips(tmp_path / "vgg16.pth", heads_path())
    x, y = image_pairs()
    with torch.no_grad():
        ref, ref_terms = model(to_nchw(x), to_nchw(y), retPerLayer=True)
    assert ref.shape == (3, 1, 1, 1)
    distance, terms = lpips_with_terms({"params": params}, x, y)
    assert distance.shape == (3,) and list(terms) == [name for name, _, _ in STAGES]
    np.testing.assert_allclose(distance[:2], ref.numpy()[:2, 0, 0, 0], rtol=1e-5)
    for (name, ours), theirs in zip(terms.items(), ref_terms):
        np.testing.assert_allclose(ours[:2], theirs.numpy()[:2, 0, 0, 0], rtol=1e-5, err_msg=name)
    assert float(distance[:2].min()) > 0.01  # not a vacuous comparison
    np.testing.assert_allclose(distance[2], 0.0, atol=1e-6)  # an image and itself


def test_unit_normalize_has_a_finite_gradient_at_zero_features():
    f = np.zeros((1, 2, 1, 4), np.float32)
    f[0, 0, 0] = [3.0, 0.0, 4.0, 0.0]
    loss = lambda f: jnp.sum(unit_normalize(f) * jnp.arange(4.0))
    normalized, grad = jax.jit(lambda f: (unit_normalize(f), jax.grad(loss)(f)))(f)
    np.testing.assert_allclose(normalized[0, 0, 0], [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(grad[0, 1, 0], np.arange(4.0) / 1e-10, rtol=1e-6)  # f / (0 + eps): linear there


def test_lpips_conversion_is_strict():
    _, vgg16 = lpips_reference()
    heads = dict(open_state_dict(heads_path()))
    params = lpips_params_from_torch(vgg16, heads)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat) == 2 * 13 + 5 == len(vgg16) + len(heads)  # every used key consumed once
    np.testing.assert_array_equal(
        params["vgg"]["features_28"]["kernel"], vgg16["features.28.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params["lin4"]["kernel"][0, 0, :, 0], heads["lin4.model.1.weight"][0, :, 0, 0])

    def error(vgg, head) -> str:
        with pytest.raises(ConversionError) as e:
            lpips_params_from_torch(vgg, head)
        return str(e.value)

    missing = {k: v for k, v in vgg16.items() if k != "features.28.bias"}
    assert "features.28.bias" in error(missing, heads) and "missing (1)" in error(missing, heads)
    assert "features.30.weight" in error(vgg16 | {"features.30.weight": np.zeros(1)}, heads)
    assert "features.0.weight: (3, 64, 3, 3), expected (64, 3, 3, 3)" in error(
        vgg16 | {"features.0.weight": vgg16["features.0.weight"].transpose(1, 0, 2, 3)}, heads
    )
    message = error(vgg16, {k: v for k, v in heads.items() if not k.startswith("lin4")})
    assert "LPIPS heads" in message and "lin4.model.1.weight" in message
    assert "scaling_layer.shift" in error(vgg16, heads | {"scaling_layer.shift": np.zeros((1, 3, 1, 1))})


def test_lpips_refuses_bad_inputs():
    x = jnp.zeros((1, 16, 16, 3))  # the checks run before any parameter is asked for
    with pytest.raises(ValueError, match="one shape"):
        Lpips().apply({"params": {}}, x, jnp.zeros((1, 16, 32, 3)))
    with pytest.raises(ValueError, match="at least 16x16"):
        Lpips().apply({"params": {}}, x[:, :8], x[:, :8])


# The PatchGAN discriminator

TAMING = PatchDiscriminatorConfig()  # ndf 64, 3 layers: taming's and ldm's


def taming_model(seed: int, **kwargs) -> torch.nn.Module:
    """taming's NLayerDiscriminator(**kwargs), initialised by its weights_init."""
    module = taming_discriminator()
    torch.manual_seed(seed)
    return module.NLayerDiscriminator(**kwargs).apply(module.weights_init)


@functools.cache
def discriminator_reference():
    """taming's discriminator (weights_init), BatchNorm biases and running averages moved off their
    initial values so that no affine term or statistic is the identity."""
    model = taming_model(0, input_nc=3, ndf=64, n_layers=3, use_actnorm=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


@functools.partial(jax.jit, static_argnames="train")
def discriminate(variables, x, train):
    return PatchDiscriminator(TAMING).apply(variables, x, train=train, mutable=["batch_stats"] if train else False)


def test_discriminator_matches_taming_in_train_and_eval_mode():
    model = discriminator_reference()
    variables = load_patch_discriminator({k: v.copy() for k, v in state_dict_numpy(model).items()})  # not views
    x = np.random.default_rng(2).uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref_eval = from_nchw(model.eval()(to_nchw(x)))
        ref_train = from_nchw(model.train()(to_nchw(x)))  # moves the running averages once
    model.eval()
    ours_eval = discriminate(variables, x, train=False)
    ours_train, updates = discriminate(variables, x, train=True)
    assert ours_eval.shape == ref_eval.shape == (4, TAMING.logits_size(64), TAMING.logits_size(64), 1) == (4, 6, 6, 1)
    assert_parity(ours_eval, ref_eval, name="eval")
    assert_parity(ours_train, ref_train, name="train")
    assert float(np.abs(ref_train - ref_eval).max()) > 0.1 * float(np.abs(ref_eval).max())  # the modes differ
    stats = {k: v for k, v in state_dict_numpy(model).items() if "running" in k}
    moved = patch_discriminator_to_torch({"params": variables["params"]} | updates)
    assert stats.keys() == {k for k in moved if "running" in k} and len(stats) == 6
    for key, ref in stats.items():  # torch: (1 - 0.1) * running + 0.1 * batch, the variance unbiased
        np.testing.assert_allclose(moved[key], ref, rtol=1e-5, atol=1e-7, err_msg=key)


def test_discriminator_initialisation_is_taming_s():
    assert discriminator_param_count(TAMING) == sum(p.numel() for p in taming_model(0).parameters()) == 2_765_633
    cfg = PatchDiscriminatorConfig(channels=16)  # the statistics of the full width's, at a quarter the draws
    init = jax.jit(lambda key: PatchDiscriminator(cfg).init(key, jnp.zeros((1, 24, 24, 3)), train=False))
    variables = jax.tree.map(np.asarray, nn.meta.unbox(init(jax.random.key(0))))
    params, stats = variables["params"], variables["batch_stats"]
    taming = taming_model(0, input_nc=3, ndf=16, n_layers=3)
    assert patch_discriminator_to_torch(variables, cfg).keys() == set(taming.state_dict()) - {
        k for k in taming.state_dict() if k.endswith("num_batches_tracked")
    }

    def close(draws, mean, std) -> bool:  # within 5 sampling errors of n draws: std / sqrt(2n), std / sqrt(n)
        n = draws.size
        return abs(draws.std() - std) < 5 * std / np.sqrt(2 * n) and abs(draws.mean() - mean) < 5 * std / np.sqrt(n)

    for k in range(cfg.n_layers + 2):  # weights_init: conv kernels N(0, 0.02), BatchNorm scales N(1, 0.02)
        assert close(params[f"conv_{k}"]["kernel"], 0.0, 0.02), k
    for k in (0, cfg.n_layers + 1):  # weights_init leaves conv biases at torch's U(-1/sqrt(fan_in), ...)
        fan_in = params[f"conv_{k}"]["kernel"][..., 0].size
        bias = params[f"conv_{k}"]["bias"]
        assert np.abs(bias).max() <= 1 / np.sqrt(fan_in) and np.abs(bias).min() > 0
    for k in range(1, cfg.n_layers + 1):
        assert close(params[f"norm_{k}"]["scale"], 1.0, 0.02), k
        np.testing.assert_array_equal(params[f"norm_{k}"]["bias"], 0.0)
        np.testing.assert_array_equal(stats[f"norm_{k}"]["mean"], 0.0)
        np.testing.assert_array_equal(stats[f"norm_{k}"]["var"], 1.0)


def test_discriminator_conversion_is_strict(tmp_path):
    cfg = PatchDiscriminatorConfig(channels=8, n_layers=2)
    bare = state_dict_numpy(taming_model(3, input_nc=3, ndf=8, n_layers=2))
    variables = load_patch_discriminator(bare, cfg)
    exported = patch_discriminator_to_torch(variables, cfg)
    assert exported.keys() == {k for k in bare if not k.endswith("num_batches_tracked")}  # all, once each
    for key, value in exported.items():
        np.testing.assert_array_equal(value, bare[key], err_msg=key)
    np.testing.assert_array_equal(variables["params"]["conv_2"]["kernel"], bare["main.5.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["norm_2"]["var"], bare["main.6.running_var"])

    others = {
        k: torch.zeros(1) for k in ("encoder.conv_in.weight", "loss.logvar", "loss.perceptual_loss.lin0.model.1.weight")
    }
    ldm = others | {f"loss.discriminator.{k}": torch.from_numpy(v) for k, v in bare.items()}
    torch.save({"state_dict": ldm}, tmp_path / "autoencoder.ckpt")
    from_file = load_patch_discriminator(tmp_path / "autoencoder.ckpt", cfg)
    jax.tree.map(np.testing.assert_array_equal, from_file, variables)

    def error(state, cfg=cfg) -> str:
        with pytest.raises(ConversionError) as e:
            load_patch_discriminator(state, cfg)
        return str(e.value)

    assert "main.8.bias" in error({k: v for k, v in bare.items() if k != "main.8.bias"})
    assert "main.9.weight" in error(bare | {"main.9.weight": np.zeros((1, 1, 4, 4))})
    assert "main.0.weight: (8, 4, 4, 4), expected (8, 3, 4, 4)" in error(
        bare | {"main.0.weight": np.zeros((8, 4, 4, 4))}
    )
    assert "main.11.weight" in error(bare, TAMING)  # a 3-layer config asks for a conv the file lacks
    assert "no discriminator weights" in error({"encoder.conv_in.weight": np.zeros(1)})
