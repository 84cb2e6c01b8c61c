"""The ADD objective in the one trainer (`train/distillation.py`): the x0 estimate in the VP form, the
student's inputs (pure noise at the last timestep), the guided teacher target, c(t), loud config errors;
a tiny run in-process (the teacher stays the initial weights, the student and the heads move, the
metrics); distillation alone leaves the heads alone; (slow) a bitwise resume with the discriminator.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.conditioning import Conditioning
from sdxl_jax.diffusion import parameterisation
from sdxl_jax.diffusion.parameterisation import vp_denoised
from sdxl_jax.sharding import make_mesh
from sdxl_jax.train.config import check
from sdxl_jax.train.distillation import c_weight, nfsd_target, student_inputs, teacher_x0
from sdxl_jax.train.objective import alphas_cumprod
from sdxl_jax.train.state import AdversarialState
from sdxl_jax.train.step import StepSpec
from tests.helpers.train import losses as logged_losses
from tests.helpers.train import tiny_config

PREDICTIONS = ("epsilon", "v_prediction", "sample")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vp_denoised_is_sigma_space_denoising(prediction):
    """x_t = alpha x0 + s eps is x = x_t / alpha in sigma space (sigma = s / alpha): the same x0 estimate."""
    rng = np.random.default_rng(0)
    x_t, out = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(2))
    ab = np.array([0.9, 0.3, 0.01], np.float32)
    alpha, s = np.sqrt(ab), np.sqrt(1 - ab)
    want = parameterisation.get(prediction).to_denoised(
        x_t / alpha[:, None, None, None], (s / alpha)[:, None, None, None], out
    )
    np.testing.assert_allclose(vp_denoised(out, x_t, alpha, s, prediction), want, rtol=2e-5, atol=2e-5)
    if prediction != "epsilon":  # finite at alpha = 0 (zero terminal SNR): v gives -v, sample itself
        at_zero = vp_denoised(out, x_t, np.zeros(3, np.float32), np.ones(3, np.float32), prediction)
        np.testing.assert_allclose(at_zero, -out if prediction == "v_prediction" else out)


def _objective(overrides=None):
    config = tiny_config("add", overrides or {})
    check(config)
    return config, StepSpec.build(config, make_mesh(config.mesh))


def test_student_inputs_come_from_its_timesteps_and_are_pure_noise_at_the_last():
    config, spec = _objective({"distillation.student_timesteps": (99, 499, 999)})
    table = jnp.asarray(alphas_cumprod(config.diffusion))
    x0 = jax.random.normal(jax.random.key(1), (64, 4, 4, 2))
    x_s, s, alpha, sigma = student_inputs(spec.objective, table, x0, jax.random.key(2))
    assert set(np.asarray(s).tolist()) == {99, 499, 999}
    eps = jax.random.normal(jax.random.split(jax.random.key(2))[1], x0.shape)  # the function's own draw
    for i in range(64):
        if int(s[i]) == 999:
            np.testing.assert_array_equal(x_s[i], eps[i])
        else:
            np.testing.assert_allclose(x_s[i], alpha[i] * x0[i] + sigma[i] * eps[i], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(alpha, np.sqrt(np.asarray(table)[np.asarray(s)]))  # the table's, for the x0
    _, plain = _objective({"distillation.zero_terminal_snr": False})  # the table's alpha at the last step too
    x_plain, _, a, sig = student_inputs(plain.objective, table, x0, jax.random.key(2))
    np.testing.assert_allclose(x_plain, a[:, None, None, None] * x0 + sig[:, None, None, None] * eps, atol=1e-6)


def test_the_teacher_target_is_guided_in_x0_space_with_the_text_zeroed():
    """A stand-in UNet whose output depends on the text: the target is x0_u + w (x0_c - x0_u), the
    unconditional branch sees zero context and a zero pooled part of y (the size part kept)."""
    _, spec = _objective()
    objective = spec.objective
    seen = []

    def unet_fn(params, x, t, context, y):
        seen.append((context, y))
        return x * 0.5 + context.mean(axis=(1, 2))[:, None, None, None] + y.sum(axis=1)[:, None, None, None]

    b = 3
    table = jnp.linspace(0.99, 0.01, 1000)
    x_t = jax.random.normal(jax.random.key(0), (b, 4, 4, 2))
    t = jnp.array([10, 500, 900])
    cond = Conditioning(jax.random.normal(jax.random.key(1), (b, 5, 8)), jax.random.normal(jax.random.key(2), (b, 40)))
    w = jnp.array([1.0, 2.0, 4.5])
    got = teacher_x0(objective, unet_fn, None, x_t, t, table, cond, w, "sample")
    context, y = seen[0]
    np.testing.assert_array_equal(context[b:], 0.0)
    np.testing.assert_array_equal(y[b:, : objective.pooled_dim], 0.0)
    np.testing.assert_array_equal(y[b:, objective.pooled_dim :], cond.y[:, objective.pooled_dim :])
    x0_c = unet_fn(None, x_t, t, cond.context, cond.y)
    x0_u = unet_fn(None, x_t, t, jnp.zeros_like(cond.context), y[b:])
    np.testing.assert_allclose(got, x0_u + w[:, None, None, None] * (x0_c - x0_u), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0], x0_c[0], rtol=1e-6, atol=1e-6)  # w = 1: the conditional estimate


def test_c_of_t():
    alpha, s = jnp.array([0.9, 0.5]), jnp.array([0.2, 0.8])
    np.testing.assert_allclose(c_weight("exponential", alpha, s), alpha)
    np.testing.assert_allclose(c_weight("sds", alpha, s), alpha / (2 * s))
    np.testing.assert_allclose(c_weight("nfsd", alpha, s), alpha / (2 * s))
    with pytest.raises(ValueError, match="nfsd"):
        c_weight("nfds", alpha, s)


def test_the_nfsd_target_is_nfsds_direction_in_eps_space():
    """From eps-space predictions: x_hat - target = (s_t / alpha_t)(delta_D + w delta_C), delta_C =
    eps_c - eps_u, delta_D = eps_u below t 200 and eps_u - eps_neg from it; so with c(t) = alpha / (2 s_t)
    the gradient of c ||x - target||² at x_hat is NFSD's update direction (the added noise left out)."""
    rng = np.random.default_rng(3)
    shape = (4, 3, 3, 2)
    x_hat, noise, eps_c, eps_u, eps_n = (rng.standard_normal(shape) for _ in range(5))
    t = np.array([50, 199, 200, 900])
    ab = np.array([0.95, 0.8, 0.79, 0.02])
    alpha, s, w = np.sqrt(ab), np.sqrt(1 - ab), np.array([7.5, 1.0, 3.0, 7.5])
    e = lambda v: v[:, None, None, None]
    x_t = e(alpha) * x_hat + e(s) * noise
    x0 = {k: (x_t - e(s) * v) / e(alpha) for k, v in (("c", eps_c), ("u", eps_u), ("n", eps_n))}
    target = np.asarray(nfsd_target(x_hat, x_t, alpha, x0["c"], x0["u"], x0["n"], w, t, 200))
    delta_d = np.where(e(t < 200), eps_u, eps_u - eps_n)
    direction = delta_d + e(w) * (eps_c - eps_u)
    np.testing.assert_allclose(x_hat - target, e(s / alpha) * direction, rtol=1e-6, atol=1e-6)
    c = np.asarray(c_weight("nfsd", alpha, s))
    grad = jax.grad(lambda x: jnp.sum(jnp.asarray(e(c)) * jnp.square(x - target)))(jnp.asarray(x_hat))
    np.testing.assert_allclose(grad, direction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distillation.features": "clip"}, "not in"),
        ({"distillation.weighting": "snr"}, "not in"),
        ({"distillation.nfsd_t_switch": 1001}, "nfsd_t_switch"),
        (
            {
                "distillation.weighting": "nfsd",
                "distillation.nfsd_t_switch": 1000,
                "diffusion.zero_terminal_snr": True,
                "diffusion.prediction": "v_prediction",
            },
            "divides by alpha_t",
        ),
        ({"distillation.dinov2_image_path": "/weights/dinov2-large"}, "read by features 'dinov2'"),
        ({"distillation.student_timesteps": (999, 499)}, "increasing"),
        ({"distillation.student_timesteps": (499, 1000)}, "within"),
        ({"diffusion.zero_terminal_snr": True}, "epsilon model on a zero-terminal-SNR table"),
        ({"distillation.guidance_min": 3.0, "distillation.guidance_max": 2.0}, "guidance_min <= guidance_max"),
        ({"distillation.distill_weight": 0.0, "distillation.adversarial_weight": 0.0}, "not both 0"),
        ({"lora.rank": 4}, "no LoRA"),
        ({"distillation.teacher_t_max": 1001}, "teacher_t_max"),
    ],
)
def test_bad_add_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        check(tiny_config("add", overrides))


def _arrays(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


FAST = {"num_steps": 2, "validation.every": 0, "export_on_finish": "none", "checkpoint_every": 100}


def test_the_step_traces_with_its_teacher_heads_and_metrics():
    """The ADD step of the tiny config, traced abstractly (nothing compiled): the state holds the UNet
    and the heads, `frozen` the teacher (the UNet's shapes), and one step gives every metric."""
    import functools

    import flax.linen as nn

    from sdxl_jax.train.memory_plan import abstract_step
    from sdxl_jax.train.step import train_step

    config = tiny_config("add")
    spec, (state, frozen, batch) = abstract_step(config, {"data": 1, "fsdp": 1, "tensor": 1}, 8, 32, 32, False,
                                                 jax.devices()[:1])  # fmt: skip
    assert set(state.params) == {"unet"} and set(state.discriminator.params) == {"head_0", "head_1", "head_2"}
    assert jax.tree.map(lambda x: x.shape, frozen["teacher"]) == jax.tree.map(lambda x: x.shape, state.params["unet"])
    new, metrics = jax.eval_shape(functools.partial(train_step, spec=spec), state, frozen, batch)
    keys = {"loss", "grad_norm", "lr", "distill_loss", "g_loss", "d_loss", "r1", "d_grad_norm", "d_lr",
            "d_accuracy_real", "d_accuracy_fake", "finite", "t_mean"}  # fmt: skip
    assert keys <= set(metrics) and all(m.shape == () for m in metrics.values())
    assert jax.tree.structure(nn.meta.unbox(new)) == jax.tree.structure(nn.meta.unbox(state))


def test_the_nfsd_step_traces_with_the_negative_prompt():
    """NFSD: `frozen` holds the negative prompt's embedding (one row, the UNet's context width and the
    pooled width), and the step traces with its third teacher branch."""
    import functools

    from sdxl_jax.train.memory_plan import abstract_step
    from sdxl_jax.train.step import train_step

    config = tiny_config("add", {"distillation.weighting": "nfsd", "distillation.guidance_max": 7.5})
    spec, (state, frozen, batch) = abstract_step(config, {"data": 1, "fsdp": 1, "tensor": 1}, 8, 32, 32, False,
                                                 jax.devices()[:1])  # fmt: skip
    negative = frozen["nfsd_negative"]
    assert negative["context"].shape == (1, 77, spec.models.unet.context_dim)
    assert negative["pooled"].shape == (1, spec.objective.pooled_dim)
    _, metrics = jax.eval_shape(functools.partial(train_step, spec=spec), state, frozen, batch)
    assert {"distill_loss", "g_loss"} <= set(metrics)


@pytest.mark.slow
def test_a_tiny_add_run(tmp_path):
    """2 steps of `configs/tiny.py:add`: the teacher is the initial UNet throughout, the student and the
    heads moved, every metric logged and finite; with the adversarial term off the heads stay as born."""
    from sdxl_jax.train.loop import train
    from sdxl_jax.train.state import create_sharded_state

    config = tiny_config("add", FAST)
    spec = StepSpec.build(config, make_mesh(config.mesh))
    born, frozen = create_sharded_state(spec)
    student0, heads0 = _arrays(born.params["unet"]), _arrays(born.discriminator.params)
    np.testing.assert_equal(_arrays(frozen["teacher"]), student0)  # the teacher starts as the student
    state = train(config, tmp_path / "run")
    assert isinstance(state, AdversarialState) and set(state.params) == {"unet"} and int(state.step) == 2
    assert any(not np.array_equal(v, student0[k]) for k, v in _arrays(state.params["unet"]).items())
    kernels = {k: v for k, v in _arrays(state.discriminator.params).items() if "kernel" in k}  # 4 a head
    assert len(kernels) == 12 and all(not np.array_equal(v, heads0[k]) for k, v in kernels.items())
    # (a head's output bias can stay: real and fake share the text, so inside the hinge's margin its
    # gradients from both cancel exactly)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {"loss", "grad_norm", "lr", "distill_loss", "g_loss", "d_loss", "r1", "d_grad_norm", "d_lr",
            "d_accuracy_real", "d_accuracy_fake", "finite", "t_mean"}  # fmt: skip
    assert keys <= set(rows[0]), keys - set(rows[0])
    assert all(np.isfinite(r[k]) for r in rows for k in keys) and all(r["r1"] > 0 for r in rows)

    alone = train(tiny_config("add", FAST | {"distillation.adversarial_weight": 0.0}), tmp_path / "alone")
    np.testing.assert_equal(_arrays(alone.discriminator.params), heads0)
    rows = [json.loads(line) for line in (tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()]
    assert "g_loss" not in rows[0] and rows[0]["distill_loss"] > 0


@pytest.mark.slow
def test_a_tiny_nfsd_run(tmp_path):
    """2 steps with NFSD: the negative prompt's embedding in `frozen` is the run's text encoders' output
    for it, and the losses are finite."""
    from sdxl_jax.conditioning import encode_text
    from sdxl_jax.tokenizer import tokenize_pair
    from sdxl_jax.train.loop import train
    from sdxl_jax.train.state import create_sharded_state

    config = tiny_config("add", FAST | {"distillation.weighting": "nfsd", "distillation.guidance_max": 7.5})
    spec = StepSpec.build(config, make_mesh(config.mesh))
    _, frozen = create_sharded_state(spec)
    models = spec.models
    context, pooled = encode_text(models.encoders(frozen), tokenize_pair([config.distillation.nfsd_negative_prompt]))
    np.testing.assert_allclose(frozen["nfsd_negative"]["context"], context, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(frozen["nfsd_negative"]["pooled"], pooled, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(pooled).max()) > 0
    train(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "distill_loss", "g_loss", "d_loss"))


@pytest.mark.slow
def test_add_resume_is_bitwise(tmp_path):
    """2 steps, a checkpoint, 2 more in a second run: the same student, EMA, heads (params, spectral
    vectors) and both optimiser states as 4 steps at once."""
    from sdxl_jax.train.loop import train

    run = FAST | {"num_steps": 4, "checkpoint_every": 2, "max_checkpoints": 5}
    straight = _arrays(train(tiny_config("add", run), tmp_path / "straight"))
    train(tiny_config("add", run | {"num_steps": 2}), tmp_path / "run")
    resumed = _arrays(train(tiny_config("add", run), tmp_path / "run"))
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "straight")
    assert set(resumed) == set(straight) and any("discriminator" in k and "spectral" in k for k in straight)
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
