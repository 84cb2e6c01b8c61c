"""The UNet's encoder features (`UNet.encode_features`) are diffusers' down-block and mid-block hidden
states, become the projected discriminator's token lists, carry gradients to the latent, and leave the
default forward exactly as it was."""

import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from flax.linen import meta

from sdxl_jax.conditioning import vector_conditioning
from sdxl_jax.convert import unet_config_from_diffusers, unet_params_from_diffusers
from sdxl_jax.models import UNet, UNetConfig
from sdxl_jax.models.projected_discriminator import ProjectedDiscriminator, ProjectedDiscriminatorConfig
from sdxl_jax.models.unet import abstract_params
from sdxl_jax.models.unet_features import (
    feature_channels,
    feature_names,
    feature_token_counts,
    feature_tokens,
    unet_feature_tokens,
)
from tests.helpers.torch_reference import from_nchw, perturb_, state_dict_numpy, to_nchw
from tests.helpers.unet_reference import (
    SDXL_TINY,
    TIME_ID_DIM,
    assert_parity,
    make_reference,
    random_inputs,
    text_time,
)

GOLDEN = Path(__file__).parent / "fixtures" / "unet_forward_golden.npz"
# `UNet.__call__`'s output on `_golden_params`/`_golden_inputs` as computed before `encode_features`
# existed (commit 6ac83eb), with XLA:CPU at the tests' fast-compile setting and at full optimisation,
# and the parameter tree; for this config:
GOLDEN_CONFIG = UNetConfig.tiny(channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1)


def hooked_reference(model, x, t, ctx, text, ids) -> dict[str, np.ndarray]:
    """diffusers' encoder hidden states (NHWC) by our names, from forward hooks on its blocks: a down
    block returns (hidden_states, res_samples); before its downsampler is the res_samples' second last."""
    seen = {}

    def keep(name):
        def hook(block, inputs, output):
            if name == "mid_block":
                seen[name] = output
            else:
                hidden, res_samples = output
                seen[name] = res_samples[-2] if block.downsamplers is not None else hidden

        return hook

    blocks = {f"down_blocks_{i}": b for i, b in enumerate(model.down_blocks)} | {"mid_block": model.mid_block}
    handles = [block.register_forward_hook(keep(name)) for name, block in blocks.items()]
    cond = dict(text_embeds=torch.from_numpy(text), time_ids=torch.from_numpy(ids))
    with torch.no_grad():
        model(to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs=cond)
    for handle in handles:
        handle.remove()
    return {name: from_nchw(value) for name, value in seen.items()}


def reference_data(model) -> dict:
    x, t, ctx, text, ids = random_inputs(model, 2, 8, 8)
    return dict(
        config=dict(model.config),
        state=state_dict_numpy(model),
        inputs=(x, t, ctx, vector_conditioning(text, ids, dim=TIME_ID_DIM)),
        expected=hooked_reference(model, x, t, ctx, text, ids),
    )


@pytest.fixture(scope="module")
def reference():
    return reference_data(make_reference(SDXL_TINY))


@pytest.fixture(scope="module")
def small_reference():
    """Two levels, one resnet each, a depth-2 transformer at level 1 and in the middle: the smallest
    UNet whose scanned layout stacks blocks (the gradient test compiles a backward pass of it)."""
    torch.manual_seed(1)
    blocks = dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=48,
    )
    model = UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8, **text_time(6, **blocks)
    )
    return reference_data(perturb_(model, seed=1))


def test_encoder_features_match_diffusers_and_fit_the_discriminator(reference):
    cfg = unet_config_from_diffusers(reference["config"])
    params = unet_params_from_diffusers(reference["state"], cfg)
    encode = jax.jit(lambda p, *a: UNet(cfg).apply({"params": p}, *a, method="encode_features"))
    features = jax.tree.map(np.asarray, encode(params, *reference["inputs"]))

    names = feature_names(cfg)
    assert names == ("down_blocks_0", "down_blocks_1", "down_blocks_2", "mid_block")
    assert set(features) == set(names) == set(reference["expected"])
    for name in names:  # 8x8 latent: levels at 8x8 (32 ch), 4x4 (64), 2x2 (128); the middle at 2x2 (128)
        assert features[name].shape == reference["expected"][name].shape, name
        assert_parity(features[name], reference["expected"][name])

    # Tokens: row-major flattening (torch's `flatten(2).transpose(1, 2)`), the helper's channels and counts.
    chosen = ("mid_block", "down_blocks_0", "down_blocks_2")
    tokens = feature_tokens(features, chosen)
    channels = feature_channels(cfg, chosen)
    assert channels == (128, 32, 128)
    assert tuple(k.shape for k in tokens) == ((2, 4, 128), (2, 64, 32), (2, 4, 128))
    assert tuple(k.shape[1] for k in tokens) == feature_token_counts(cfg, chosen, 8, 8)
    for name, k in zip(chosen, tokens):
        as_torch = to_nchw(reference["expected"][name]).flatten(2).transpose(1, 2).numpy()
        assert_parity(k, as_torch)

    # The discriminator derived from the helper takes them as they are (shapes only: nothing compiles).
    disc_cfg = ProjectedDiscriminatorConfig.tiny(feature_channels=channels)
    text = jnp.zeros((2, disc_cfg.text_embed_dim))
    disc = ProjectedDiscriminator(disc_cfg)
    variables = jax.eval_shape(lambda: disc.init(jax.random.key(0), tokens, text, train=False))
    logits = jax.eval_shape(lambda v: disc.apply(v, tokens, text, train=False), variables)
    assert tuple(out.shape for out in logits) == ((2, 4), (2, 64), (2, 4))


def test_scanned_rematerialised_encoder_features_and_their_gradient(small_reference):
    """In the stacked-blocks layout under full remat the features are diffusers', and the gradient of a
    discriminator-like score of them w.r.t. the latent is the score's slope (central differences)."""
    reference = small_reference
    cfg = unet_config_from_diffusers(reference["config"], scan_layers=True).replace(remat="full")
    params = unet_params_from_diffusers(reference["state"], cfg)
    names = feature_names(cfg)
    x, t, ctx, y = reference["inputs"]
    rng = np.random.default_rng(2)
    shapes = zip(feature_token_counts(cfg, names, 8, 8), feature_channels(cfg, names))
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]  # one per token and channel

    def score(latent):
        tokens = unet_feature_tokens(cfg, params, latent, t, ctx, y, names)
        return sum(jnp.mean(k * w) for k, w in zip(tokens, weights)), tokens

    score_and_grad = jax.jit(jax.value_and_grad(score, has_aux=True))
    (_, tokens), grad = score_and_grad(x)
    for name, k in zip(names, tokens):
        expected = reference["expected"][name]
        assert_parity(np.asarray(k), expected.reshape(expected.shape[0], -1, expected.shape[-1]))

    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.linalg.norm(grad) > 0
    assert np.count_nonzero(grad) == grad.size  # every latent element reaches the features
    eps, direction = 1e-2, grad / np.linalg.norm(grad)
    (up, _), _ = score_and_grad(x + eps * direction)
    (down, _), _ = score_and_grad(x - eps * direction)
    np.testing.assert_allclose((float(up) - float(down)) / (2 * eps), np.linalg.norm(grad), rtol=1e-2)


def _golden_params(cfg: UNetConfig) -> dict:
    """Fixed, platform-independent weights: numpy draws in the tree's (sorted) order."""
    rng = np.random.default_rng(0)

    def draw(path, s):
        name, n = jax.tree_util.keystr(path), rng.standard_normal(s.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return 1 + 0.1 * n
        if name.endswith("['bias']"):
            return 0.1 * n
        return n / np.sqrt(np.prod(s.shape[:-1]))

    return jax.tree_util.tree_map_with_path(draw, meta.unbox(abstract_params(cfg)))


def _golden_inputs(cfg: UNetConfig):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    t = np.array([10.0, 500.0], np.float32)
    ctx = rng.standard_normal((2, 5, cfg.context_dim)).astype(np.float32)
    y = rng.standard_normal((2, cfg.adm_in_channels)).astype(np.float32)
    return x, t, ctx, y


def _param_tree(cfg: UNetConfig) -> list[str]:
    """Every parameter's path, shape, dtype and logical axis names."""
    leaves = jax.tree_util.tree_leaves_with_path(
        abstract_params(cfg), is_leaf=lambda v: isinstance(v, meta.Partitioned)
    )
    return [f"{jax.tree_util.keystr(p)} {v.value.shape} {v.value.dtype} {v.names}" for p, v in leaves]


def _platform() -> str:
    """What decides XLA:CPU's summation order here: the JAX version and the instruction set."""
    cpuinfo = Path("/proc/cpuinfo")
    avx512 = cpuinfo.exists() and "avx512f" in cpuinfo.read_text().split()
    return f"jax {jax.__version__} {platform.machine()} avx512f={avx512}"


def test_default_forward_is_unchanged():
    """`UNet.__call__`'s parameter tree and output equal those stored before `encode_features` existed:
    bitwise on the machine and XLA settings that stored them, within 1e-6 x scale elsewhere (XLA:CPU's
    summation order follows the instruction set and optimisation level)."""
    golden = np.load(GOLDEN)
    cfg = GOLDEN_CONFIG
    assert _param_tree(cfg) == list(golden["param_tree"])

    params = _golden_params(cfg)
    out = np.asarray(jax.jit(UNet(cfg).apply)({"params": params}, *_golden_inputs(cfg)))
    fast = "xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", "")
    expected = golden["fast_compile" if fast else "full_opt"]
    if str(golden["platform"]) == _platform():
        np.testing.assert_array_equal(out, expected)
    else:
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))

    # encode_features reads no decoder parameter: it runs without them.
    encoder = {k: v for k, v in params.items() if not k.startswith("up_blocks") and not k.startswith("conv_")}
    encoder["conv_in"] = params["conv_in"]
    shapes = jax.eval_shape(
        lambda p: UNet(cfg).apply({"params": p}, *_golden_inputs(cfg), method="encode_features"), encoder
    )
    assert {k: v.shape for k, v in shapes.items()} == {
        "down_blocks_0": (2, 8, 8, 32),
        "down_blocks_1": (2, 4, 4, 64),
        "mid_block": (2, 4, 4, 64),
    }


def test_feature_helpers_on_full_size_configs():
    base, refiner = UNetConfig.sdxl_base(), UNetConfig.sdxl_refiner()
    assert feature_names(base) == ("down_blocks_0", "down_blocks_1", "down_blocks_2", "mid_block")
    assert feature_channels(base, feature_names(base)) == (320, 640, 1280, 1280)
    assert feature_token_counts(base, feature_names(base), 128, 128) == (16384, 4096, 1024, 1024)
    assert feature_token_counts(base, ("mid_block", "down_blocks_1"), 64, 96) == (384, 1536)
    assert feature_channels(refiner, ("down_blocks_3", "mid_block", "down_blocks_0")) == (1536, 1536, 384)
    for bad, match in [
        (("down_blocks_3",), "not a UNet encoder feature"),
        (("mid_block", "mid_block"), "repeat"),
        ((), "at least one"),
        ("mid_block", "at least one"),
    ]:
        with pytest.raises(ValueError, match=match):
            feature_channels(base, bad)
    with pytest.raises(ValueError, match="multiple of the UNet's downsampling factor"):
        feature_token_counts(base, ("mid_block",), 126, 128)
    with pytest.raises(ValueError, match="not among"):
        feature_tokens({"mid_block": jnp.zeros((1, 2, 2, 4))}, ("down_blocks_0",))
