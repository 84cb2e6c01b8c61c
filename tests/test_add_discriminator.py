"""ADD's projected discriminator and its losses against closed forms: the spectral-norm estimate reaches
numpy's largest singular value (and one power iteration equals torch's `spectral_norm`), local batch norm
normalises each group with its own statistics, the kernel-9 conv is a circular convolution, the hinge
losses and accuracies of hand-picked logits, R1 against finite differences, and the whole
discriminator's shapes, gradients and conditioning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree

from sdxl_jax.models import projected_discriminator as pd
from sdxl_jax.models.dinov2 import Dinov2Config
from sdxl_jax.train import adversarial
from tests.helpers.params import normal_like

F32 = jnp.float32


def _circular_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """y[b, n, o] = sum_{j, i} x[b, (n + j - k // 2) mod N, i] kernel[j, i, o] + bias[o]."""
    k, n = kernel.shape[0], x.shape[1]
    y = np.zeros((x.shape[0], n, kernel.shape[-1]))
    for j in range(k):
        y += np.roll(x, k // 2 - j, axis=1) @ kernel[j]  # roll by s: out[n] = x[(n - s) mod N]
    return y + bias


def _torch_matrix(kernel: np.ndarray) -> np.ndarray:
    """torch's `[out, in * k]` view of a `[k, in, out]` kernel."""
    return kernel.transpose(2, 1, 0).reshape(kernel.shape[-1], -1)


def _rng(seed: int):
    return np.random.default_rng(seed)


def _init(module, seed: int, *args, **kwargs):
    """The module's own initial variables (unboxed), initialised under `jit`."""
    init = jax.jit(lambda key, *a: module.init(key, *a, **kwargs))
    return nn.meta.unbox(init(jax.random.key(seed), *args))


def _variables(module, seed: int, *args, **kwargs):
    """Random variables in the module's tree (`normal_like`): N(0, 1) parameters, unit spectral vectors."""
    variables = normal_like(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)), seed)
    unit = lambda v: v / np.linalg.norm(v).astype(v.dtype)
    return {"params": variables["params"], pd.SPECTRAL: jax.tree.map(unit, variables[pd.SPECTRAL])}


def _apply(module, train: bool, mutable=False):
    """`module.apply` under `jit`, its training flag and mutable collections fixed."""
    return jax.jit(lambda variables, *a: module.apply(variables, *a, train=train, mutable=mutable))


def test_spectral_norm_converges_to_the_largest_singular_value_and_eval_keeps_the_estimate():
    layer = pd.SpectralConv1d(6, 3, 1e-12, F32, F32)
    x = _rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    variables = _variables(layer, 1, x, train=False)
    params = variables["params"]
    kernel, bias = np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)
    u_svd, s, vt = np.linalg.svd(_torch_matrix(kernel))
    raw = _circular_conv(x, kernel, 0.0)

    @jax.jit
    def iterate(spectral):
        """40 training calls, each storing its u, v; then an evaluation call on the last ones."""

        def step(state, _):
            y, upd = layer.apply({"params": params, pd.SPECTRAL: state}, x, train=True, mutable=[pd.SPECTRAL])
            return upd[pd.SPECTRAL], y

        final, ys = jax.lax.scan(step, spectral, None, length=40)
        evaluated = layer.apply({"params": params, pd.SPECTRAL: final}, x, train=False, mutable=[pd.SPECTRAL])
        return final, ys, evaluated

    final, ys, (y_eval, upd) = iterate(variables[pd.SPECTRAL])
    # each output is raw / sigma + bias: read the estimate off it
    sigmas = [np.sum(raw * raw) / np.sum(raw * (np.asarray(y, np.float64) - bias)) for y in ys]
    assert sigmas[0] < 0.99 * s[0]  # one iteration from a random u is not there yet
    assert np.all(np.diff(sigmas) > -1e-5 * s[0])  # power iteration's estimate only grows
    np.testing.assert_allclose(sigmas[-1], s[0], rtol=1e-5)
    np.testing.assert_allclose(ys[-1], raw / s[0] + bias, rtol=1e-4, atol=1e-5)
    # u, v are the top singular vectors of torch's [out, in * k] view, both unit length
    assert abs(np.dot(final["u"], u_svd[:, 0])) == pytest.approx(1.0, abs=1e-5)
    assert abs(np.dot(final["v"], vt[0])) == pytest.approx(1.0, abs=1e-5)

    # eval: sigma from the stored u, v (the last training call's), which stay as they are
    np.testing.assert_allclose(y_eval, ys[-1], rtol=1e-6, atol=1e-7)
    jax.tree.map(np.testing.assert_array_equal, upd[pd.SPECTRAL], final)


def test_kernel_9_conv_is_circular_and_one_power_iteration_equals_torch_spectral_norm():
    layer = pd.SpectralConv1d(5, 9, 1e-12, F32, F32)
    x = _rng(2).standard_normal((2, 6, 3)).astype(np.float32)  # fewer tokens than taps: wraps more than once
    variables = _init(layer, 3, x, train=False)
    params, spectral = variables["params"], variables[pd.SPECTRAL]
    kernel, bias = np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)
    u, v = np.asarray(spectral["u"], np.float64), np.asarray(spectral["v"], np.float64)
    assert u.shape == (5,) and v.shape == (3 * 9,)
    # torch's initialisation: unit u, v; kernel and bias U(+-1/sqrt(fan_in)), fan_in = 3 * 9
    np.testing.assert_allclose([np.linalg.norm(u), np.linalg.norm(v)], 1.0, rtol=1e-6)
    assert np.abs(kernel).max() <= 27**-0.5 and np.abs(bias).max() <= 27**-0.5 and kernel.std() > 0.1

    y_eval = _apply(layer, False)(variables, x)
    sigma = u @ _torch_matrix(kernel) @ v
    np.testing.assert_allclose(y_eval, _circular_conv(x, kernel / sigma, bias), rtol=1e-5, atol=1e-6)

    # training mode against torch's Conv1d(padding_mode="circular") + spectral_norm, buffers copied
    x_t = _rng(4).standard_normal((2, 12, 3)).astype(np.float32)
    y, upd = _apply(layer, True, [pd.SPECTRAL])(variables, x_t)
    conv = torch.nn.Conv1d(3, 5, 9, padding=4, padding_mode="circular")
    conv = torch.nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12)
    with torch.no_grad():
        conv.weight_orig.copy_(torch.from_numpy(kernel.transpose(2, 1, 0).astype(np.float32)))
        conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        conv.weight_u.copy_(torch.from_numpy(u.astype(np.float32)))
        conv.weight_v.copy_(torch.from_numpy(v.astype(np.float32)))
        want = conv.train()(torch.from_numpy(x_t).permute(0, 2, 1)).permute(0, 2, 1).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd[pd.SPECTRAL]["u"], conv.weight_u.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(upd[pd.SPECTRAL]["v"], conv.weight_v.numpy(), rtol=1e-5, atol=1e-7)


def test_local_batch_norm_normalises_each_group_with_its_own_statistics():
    norm = pd.LocalBatchNorm(8, 1e-5, F32, F32)
    rng = _rng(5)
    scale, shift = rng.standard_normal(3), rng.standard_normal(3)
    params = {"params": {"scale": jnp.asarray(scale, F32), "bias": jnp.asarray(shift, F32)}}
    apply = jax.jit(norm.apply)

    def numpy_norm(x, size):
        out = np.empty_like(x)
        for start in range(0, len(x), size):
            g = x[start : start + size]
            mean, var = g.mean(axis=(0, 1)), g.var(axis=(0, 1))  # biased, per channel
            out[start : start + size] = (g - mean) / np.sqrt(var + 1e-5) * scale + shift
        return out

    for batch, size in ((16, 8), (12, 6), (4, 4)):  # ceil(B / 8) equal groups, as StyleGAN-T's BatchNormLocal
        x = rng.standard_normal((batch, 5, 3)) * (1 + np.arange(batch))[:, None, None] + np.arange(batch)[:, None, None]
        got = apply(params, jnp.asarray(x, F32))
        np.testing.assert_allclose(got, numpy_norm(x, size), rtol=1e-4, atol=1e-4)
        if batch > size:
            assert not np.allclose(got, numpy_norm(x, batch), atol=1e-2)  # not the whole batch's statistics
    with pytest.raises(ValueError, match="does not split"):
        apply(params, jnp.zeros((9, 5, 3)))


def test_readout_adds_cls_to_every_patch_token_of_the_hooked_hidden_states():
    h = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    np.testing.assert_array_equal(pd.readout(h), h[:, 1:] + h[:, :1])
    # StyleGAN-T's hooks: the embeddings and ViT-S's blocks 2, 5, 8, 11; every sixth of ViT-L's 24
    for cfg, hooked in ((Dinov2Config.vit_s14(), [0, 3, 6, 9, 12]), (Dinov2Config.vit_l14(), [0, 6, 12, 18, 24])):
        hidden = [np.full((1, 3, 2), float(i)) for i in range(cfg.num_layers + 1)]
        assert [float(f[0, 0, 0]) for f in pd.head_features(hidden, cfg)] == [2.0 * i for i in hooked]
        with pytest.raises(ValueError, match=f"has {cfg.num_layers + 1} hidden states, got {cfg.num_layers}"):
            pd.head_features(hidden[1:], cfg)
    with pytest.raises(ValueError, match="evenly spaced"):
        pd.dinov2_hidden_states(Dinov2Config.tiny())  # 2 layers


# hand-picked logits of two heads (B = 2, 2 and 3 tokens)
REAL = [np.array([[2.0, 0.5], [-1.0, 1.0]]), np.array([[0.0, 3.0, 1.5], [-0.5, 0.9, 2.0]])]
FAKE = [np.array([[-2.0, -0.5], [1.0, 0.0]]), np.array([[-1.0, 0.5, -3.0], [2.0, -0.2, 0.0]])]


def test_hinge_losses_and_accuracy_on_hand_picked_logits():
    @jax.jit
    def losses(real, fake):
        return {
            "terms": adversarial.discriminator_hinge_terms(real, fake),
            "terms_mean": adversarial.discriminator_hinge_terms(real, fake, heads="mean"),
            "d": adversarial.discriminator_hinge_loss(real, fake),
            "g": adversarial.generator_hinge_loss(fake),
            "g_mean": adversarial.generator_hinge_loss(fake, heads="mean"),
            "accuracy": adversarial.discriminator_accuracy(real, fake),
        }

    got = losses([jnp.asarray(x, F32) for x in REAL], [jnp.asarray(x, F32) for x in FAKE])
    # relu(1 - real): head 0 (0 + .5 + 2 + 0) / 4, head 1 (1 + 0 + 0 + 1.5 + .1 + 0) / 6
    # relu(1 + fake): head 0 (0 + .5 + 2 + 1) / 4, head 1 (0 + 1.5 + 0 + 3 + .8 + 1) / 6
    real_terms, fake_terms = (0.625, 2.6 / 6), (0.875, 6.3 / 6)
    np.testing.assert_allclose(got["terms"], (sum(real_terms), sum(fake_terms)), rtol=1e-6)
    np.testing.assert_allclose(got["terms_mean"], (sum(real_terms) / 2, sum(fake_terms) / 2), rtol=1e-6)
    assert float(got["d"]) == pytest.approx(sum(real_terms) + sum(fake_terms), rel=1e-6)
    # -mean(fake): head 0 -(-1.5 / 4), head 1 -(-1.7 / 6)
    assert float(got["g"]) == pytest.approx(0.375 + 1.7 / 6, rel=1e-6)
    assert float(got["g_mean"]) == pytest.approx((0.375 + 1.7 / 6) / 2, rel=1e-6)
    # real > 0: 3 of 4 and 4 of 6 (0 is wrong); fake < 0: 2 of 4 and 3 of 6
    assert float(got["accuracy"]["real"]) == pytest.approx(0.7) and float(got["accuracy"]["fake"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="heads"):
        adversarial.combine_heads([1.0], heads="max")


def _inputs(cfg, batch, tokens, seed):
    """Random head inputs `[batch, tokens[k], C_k]`, text and image embeddings, in the compute dtype."""
    rng = _rng(seed)
    array = lambda *shape: jnp.asarray(rng.standard_normal(shape), cfg.dtype)
    features = [array(batch, n, c) for n, c in zip(tokens, cfg.feature_channels)]
    return features, array(batch, cfg.text_embed_dim), array(batch, cfg.image_embed_dim)


def test_r1_equals_the_finite_difference_gradient_norm():
    with jax.enable_x64(True):
        cfg = pd.ProjectedDiscriminatorConfig.tiny(feature_channels=(3, 4), dtype="float64", param_dtype="float64")
        model = pd.ProjectedDiscriminator(cfg)
        features, text, image = _inputs(cfg, 2, (3, 2), seed=6)

        variables = _variables(model, 7, features, text, image, train=False)

        @jax.jit  # one program: R1, a plain forward and the finite differences
        def run(f, h=1e-6):
            logits_fn = lambda f: model.apply(variables, f, text, image, train=True, mutable=[pd.SPECTRAL])
            # central differences of S = the sum of every head's logits, one input value at a time
            flat, unravel = ravel_pytree(f)
            score = jax.vmap(lambda x: sum(jnp.sum(y) for y in logits_fn(unravel(x))[0]))
            steps = h * jnp.eye(flat.size, dtype=flat.dtype)
            scores = score(flat + jnp.concatenate([steps, -steps]))
            fd = unravel((scores[: flat.size] - scores[flat.size :]) / (2 * h))
            return adversarial.r1_penalty(logits_fn, f), logits_fn(f), fd

        (penalty, logits, aux), plain, fd = run(features)
        jax.tree.map(np.testing.assert_array_equal, (logits, aux), plain)  # the forward's logits and updates
        r1_fd = []
        for grad in fd:
            grad = np.asarray(grad)
            assert grad.dtype == np.float64 and np.abs(grad).max() > 1e-3  # the head depends on its input
            r1_fd.append(1e-5 / 2 * np.mean(np.sum(grad**2, axis=(1, 2))))  # gamma / 2 E|grad|², heads summed
        assert adversarial.R1_GAMMA == 1e-5
        np.testing.assert_allclose(float(penalty), sum(r1_fd), rtol=1e-6)


def test_r1_token_and_head_reductions_on_linear_heads():
    # head k: logits[b, n] = f_k[b, n] . w_k, so d sum_n logits / d f_k[b, n] = w_k for every token
    w = [np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)]
    features = [jnp.ones((2, 3, 2), F32), jnp.ones((2, 4, 1), F32)]  # N = 3 and 4 tokens
    logits_fn = lambda f: ([x @ wk for x, wk in zip(f, w)], None)
    run = jax.jit(lambda f: [adversarial.r1_penalty(logits_fn, f, 2.0, h, t)[0] for h, t in REDUCTIONS])
    # per example |grad|² = N |w|² (token sum) or |w|² / N (token mean); gamma / 2 = 1
    token_sum, token_mean = (3 * 5.0, 4 * 9.0), (5.0 / 3, 9.0 / 4)
    want = [sum(token_sum), sum(token_sum) / 2, sum(token_mean), sum(token_mean) / 2]
    np.testing.assert_allclose(run(features), want, rtol=1e-6)


REDUCTIONS = (("sum", "sum"), ("mean", "sum"), ("sum", "mean"), ("mean", "mean"))


def test_discriminator_shapes_parameters_and_gradients():
    cfg = pd.ProjectedDiscriminatorConfig.tiny()
    model = pd.ProjectedDiscriminator(cfg)
    features, text, image = _inputs(cfg, 16, (5, 7), seed=8)  # two local-norm groups; heads of 5 and 7 tokens

    variables = _variables(model, 9, features, text, image, train=False)

    @jax.jit
    def logits_and_grads(f):
        def loss(f):
            out, _ = model.apply(variables, f, text, image, train=True, mutable=[pd.SPECTRAL])
            return adversarial.generator_hinge_loss(out), out

        return jax.grad(loss, has_aux=True)(f)

    grads, logits = logits_and_grads(features)
    assert [x.shape for x in logits] == [(16, 5), (16, 7)] and all(x.dtype == F32 for x in logits)
    for g, f in zip(grads, features):
        assert g.shape == f.shape and np.all(np.isfinite(g))
        assert np.all(np.abs(g).sum(axis=(1, 2)) > 0)  # every example's features get a gradient

    # the full-size tree: five heads of 384 channels (ViT-S/14), conditioned on 1280 (bigG's projection)
    # + 1024 (ViT-L/14) dims through 64
    full = pd.ProjectedDiscriminatorConfig()
    assert (full.feature_channels, full.text_embed_dim, full.image_embed_dim) == ((384,) * 5, 1280, 1024)
    c, per_head = 384, 0
    per_head += c * c + c + 2 * c  # conv_0 (kernel 1) + norm_0
    per_head += 9 * c * c + c + 2 * c  # conv_1 (kernel 9) + norm_1
    per_head += c * 64 + 64 + (1280 + 1024) * 64 + 64  # cls + cmapper
    assert pd.discriminator_param_count(full) == 5 * per_head == 8_245_120
    spectral = pd.abstract_variables(full)[pd.SPECTRAL]["head_0"]
    shapes = {name: (s["u"].shape, s["v"].shape) for name, s in spectral.items()}
    assert shapes == {"conv_0": ((c,), (c,)), "conv_1": ((c,), (9 * c,)), "cls": ((64,), (c,))}
    # the cached tree (traced once in fp32) is what init gives at another param_dtype: spectral vectors fp32
    bf16 = cfg.replace(param_dtype="bfloat16")
    traced = jax.eval_shape(
        lambda: pd.ProjectedDiscriminator(bf16).init(jax.random.key(0), features, text, image, train=False)
    )
    assert pd.abstract_variables(bf16) == traced
    assert {x.dtype for x in jax.tree.leaves(traced[pd.SPECTRAL])} == {np.dtype("float32")}


def test_conditioning_changes_the_logits():
    cfg = pd.ProjectedDiscriminatorConfig.tiny(feature_channels=(8,))
    model = pd.ProjectedDiscriminator(cfg)
    features, text, image = _inputs(cfg, 4, (3,), seed=10)
    variables = _variables(model, 11, features, text, image, train=False)
    apply = _apply(model, False)
    run = lambda t, i, v=variables: np.asarray(apply(v, features, t, i)[0])
    base = run(text, image)
    assert np.abs(run(text + 1.0, image) - base).min() > 0  # every logit moves with the text
    assert np.abs(run(text, image + 1.0) - base).min() > 0  # and with the image embedding
    # the logit is <cls(h), cmapper(c)> / sqrt(c_dim): doubling the projected condition doubles the logits
    params = variables["params"]
    cmapper = jax.tree.map(lambda x: 2 * x, params["head_0"]["cmapper"])
    doubled = {**variables, "params": {"head_0": {**params["head_0"], "cmapper": cmapper}}}
    np.testing.assert_allclose(run(text, image, doubled), 2 * base, rtol=1e-5, atol=1e-6)
    # the condition is [text, image], zeros standing for a missing image embedding
    joined = lambda i: model.apply({}, 4, text, i, method=pd.ProjectedDiscriminator.conditioning)
    np.testing.assert_array_equal(joined(image), np.concatenate([text, image], axis=1))
    np.testing.assert_array_equal(joined(None), np.concatenate([text, np.zeros_like(image)], axis=1))
    with pytest.raises(ValueError, match="text_embed is required"):
        model.apply({}, 4, None, image, method=pd.ProjectedDiscriminator.conditioning)

    # unconditional heads: a one-channel output conv is the logit (shapes only: nothing compiled)
    unconditional = pd.ProjectedDiscriminator(cfg.replace(text_embed_dim=0, image_embed_dim=0))
    v = nn.meta.unbox(jax.eval_shape(lambda: unconditional.init(jax.random.key(0), features, None, train=False)))
    assert "cmapper" not in v["params"]["head_0"] and v["params"]["head_0"]["cls"]["kernel"].shape == (1, 8, 1)
    out = jax.eval_shape(lambda variables: unconditional.apply(variables, features, None, train=False), v)
    assert [x.shape for x in out] == [(4, 3)]
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(lambda variables: unconditional.apply(variables, features, text, train=False), v)
