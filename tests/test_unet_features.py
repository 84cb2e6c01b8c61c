"""The UNet's encoder features (`UNet.encode_features`) are diffusers' down-block and mid-block hidden
states, become the projected discriminator's token lists and carry gradients to the latent; the method
reads only the encoder's parameters, which are `__call__`'s."""

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
from sdxl_jax.models.unet import feature_names
from sdxl_jax.models.unet_features import feature_channels, feature_token_counts, feature_tokens, unet_feature_tokens
from tests.helpers.torch_reference import assert_parity, from_nchw, perturb_, state_dict_numpy, to_nchw
from tests.helpers.unet_reference import TIME_ID_DIM, random_inputs, text_time


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


@pytest.fixture(scope="module")
def small_reference():
    """Two levels, one resnet each, a depth-2 transformer at level 1 and in the middle: the smallest
    UNet whose scanned layout stacks blocks (the test compiles a backward pass of it)."""
    torch.manual_seed(1)
    blocks = dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=48,
    )
    model = perturb_(
        UNet2DConditionModel(
            in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8, **text_time(6, **blocks)
        ),
        seed=1,
    )
    x, t, ctx, text, ids = random_inputs(model, 2, 8, 8)
    return dict(
        config=dict(model.config),
        state=state_dict_numpy(model),
        inputs=(x, t, ctx, vector_conditioning(text, ids, dim=TIME_ID_DIM)),
        expected=hooked_reference(model, x, t, ctx, text, ids),
    )


def check_features_tokens_and_gradient(cfg: UNetConfig, reference: dict):
    """One compiled program: the token lists of every feature (`unet_feature_tokens`) and the gradient
    w.r.t. the latent of a discriminator-like score of them. The tokens are diffusers' hidden states
    flattened as torch flattens them; the gradient reaches every latent element and is the score's slope
    (central differences, the same program run twice more)."""
    params = unet_params_from_diffusers(reference["state"], cfg)
    names = feature_names(cfg)
    assert names == ("down_blocks_0", "down_blocks_1", "mid_block") and set(reference["expected"]) == set(names)
    x, t, ctx, y = reference["inputs"]
    counts, channels = feature_token_counts(cfg, names, 8, 8), feature_channels(cfg, names)
    assert counts == (64, 16, 16) and channels == (32, 64, 64)  # 8x8 latent: 8x8 (32 ch), 4x4 (64), mid 4x4 (64)
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in zip(counts, channels)]

    def score(latent, params):
        tokens = unet_feature_tokens(cfg, params, latent, t, ctx, y, names)
        return sum(jnp.mean(k * w) for k, w in zip(tokens, weights)), tokens

    score_and_grad = jax.jit(jax.value_and_grad(score, has_aux=True))
    (_, tokens), grad = score_and_grad(x, params)
    for name, k in zip(names, tokens):  # torch's `flatten(2).transpose(1, 2)`: token n is pixel (n // w, n % w)
        as_torch = to_nchw(reference["expected"][name]).flatten(2).transpose(1, 2).numpy()
        assert k.shape == (2, *as_torch.shape[1:]) == (2, counts[names.index(name)], channels[names.index(name)])
        assert_parity(k, as_torch)

    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.count_nonzero(grad) == grad.size  # every latent element reaches them
    eps, direction = 1e-2, grad / np.linalg.norm(grad)
    (up, _), _ = score_and_grad(x + eps * direction, params)
    (down, _), _ = score_and_grad(x - eps * direction, params)
    np.testing.assert_allclose((float(up) - float(down)) / (2 * eps), np.linalg.norm(grad), rtol=1e-2)
    return tokens


def test_encoder_features_match_diffusers_become_tokens_and_carry_gradients(small_reference):
    cfg = unet_config_from_diffusers(small_reference["config"])
    tokens = check_features_tokens_and_gradient(cfg, small_reference)

    # `feature_tokens` keeps the order asked for (here on diffusers' maps); the discriminator derived
    # from the helpers takes the lists as they are (shapes only: nothing compiles).
    chosen = ("mid_block", "down_blocks_0")
    picked = feature_tokens(small_reference["expected"], chosen)
    assert_parity(tokens[2], picked[0])
    assert_parity(tokens[0], picked[1])
    disc_cfg = ProjectedDiscriminatorConfig.tiny(feature_channels=feature_channels(cfg, chosen))
    text = jnp.zeros((2, disc_cfg.text_embed_dim))
    disc = ProjectedDiscriminator(disc_cfg)
    variables = jax.eval_shape(lambda: disc.init(jax.random.key(0), picked, text, train=False))
    logits = jax.eval_shape(lambda v: disc.apply(v, picked, text, train=False), variables)
    assert tuple(out.shape for out in logits) == ((2, 16), (2, 64))


@pytest.mark.slow
def test_scanned_rematerialised_encoder_features_and_their_gradient(small_reference):
    """The same in the stacked-blocks layout under full remat."""
    cfg = unet_config_from_diffusers(small_reference["config"], scan_layers=True).replace(remat="full")
    check_features_tokens_and_gradient(cfg, small_reference)


def test_encode_features_reads_only_the_encoder_parameters():
    """Traced, not compiled: the parameters `encode_features` creates are exactly `__call__`'s without the
    decoder (same paths, shapes, dtypes and logical axes; `__call__`'s whole tree is the real
    checkpoint's, `test_unet_structure`), and it runs on them alone."""
    cfg = UNetConfig.tiny(channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1)
    x, t = jnp.zeros((2, 8, 8, cfg.in_channels)), jnp.zeros((2,))
    ctx, y = jnp.zeros((2, 5, cfg.context_dim)), jnp.zeros((2, cfg.adm_in_channels))
    init = lambda **kw: jax.eval_shape(lambda: UNet(cfg).init(jax.random.key(0), x, t, ctx, y, **kw))["params"]
    full, encoder = init(), init(method="encode_features")
    decoder = {"up_blocks_0", "up_blocks_1", "conv_norm_out", "conv_out"}
    assert set(full) == set(encoder) | decoder and not set(encoder) & decoder
    assert encoder == {name: tree for name, tree in full.items() if name not in decoder}

    run = lambda p: UNet(cfg).apply({"params": p}, x, t, ctx, y, method="encode_features")
    shapes = jax.eval_shape(run, meta.unbox(encoder))
    assert {name: v.shape for name, v in shapes.items()} == {
        "down_blocks_0": (2, 8, 8, 32),
        "down_blocks_1": (2, 4, 4, 64),
        "mid_block": (2, 4, 4, 64),
    }
    assert tuple(shapes) == feature_names(cfg)


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
    with pytest.raises(ValueError, match="at least one"):
        feature_tokens({"mid_block": jnp.zeros((1, 2, 2, 4))}, ())
