"""The autoencoder objective in the one trainer (`train/autoencoder.py`): the step's gradients and adaptive
weight against the loss written out on a tiny VAE, decoder-only's split of the state, the VAE exports
read back exactly (here and by diffusers), PSNR and SSIM against scikit-image, loud config errors, the
planner's abstract step; then (slow) tiny runs in-process: what the state holds, the metrics, validation,
the exports against the EMA, and a bitwise resume with the discriminator switched on.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdxl_jax.models import PatchDiscriminator, VAEConfig
from sdxl_jax.models import vae as vae_model
from sdxl_jax.sharding import make_mesh
from sdxl_jax.train import autoencoder_losses as losses
from sdxl_jax.train.autoencoder import generator_step, last_layer, reconstruct
from sdxl_jax.train.config import check
from sdxl_jax.train.state import AdversarialState, abstract_state, discriminator_state, new_state
from sdxl_jax.train.step import StepSpec
from tests.helpers.train import losses as logged_losses
from tests.helpers.train import tiny_config

# A VAE and a discriminator small enough to compile in seconds; LPIPS off (its VGG16 is the slow part).
MICRO = {"model.vae.block_out_channels": (4,), "model.vae.norm_groups": 4, "model.vae.mid_block_attention": False,
         "autoencoder.discriminator.channels": 4, "autoencoder.discriminator.n_layers": 1,
         "autoencoder.loss.perceptual_weight": 0.0, "autoencoder.lpips_random_vgg": False}  # fmt: skip


def micro_spec(overrides: dict):
    config = tiny_config("autoencoder", MICRO | overrides)
    check(config)
    return config, StepSpec.build(config, make_mesh(config.mesh))


def random_tree(abstract, seed: int = 0, scale: float = 0.2) -> dict:
    """Random fp32 numpy arrays (scale * N(0, 1), positive where named `scale` or `var`) in the shapes of a
    boxed abstract tree: params without compiling an init."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        value = scale * rng.standard_normal(x.shape).astype(np.float32)
        return np.abs(value) + 0.5 if jax.tree_util.keystr(path).endswith(("['scale']", "['var']")) else value

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


def test_the_steps_gradients_and_adaptive_weight_are_the_loss_written_out():
    """`generator_step` takes the last layer's NLL and G gradients and the whole loss's gradient from one
    VAE forward (a `vjp` applied to three cotangents); here each is `jax.grad` of the loss written out,
    at step 0 with `disc_start` 0 (so the adversarial term is in the gradient) and a learned logvar."""
    overrides = {"autoencoder.loss.disc_start": 0, "autoencoder.loss.learn_logvar": True,
                 "autoencoder.loss.logvar_init": 0.3, "autoencoder.loss.kl_weight": 0.5}  # fmt: skip
    config, spec = micro_spec(overrides)
    variables = random_tree(spec.objective.abstract_discriminator(), 1)
    params = {"vae": random_tree(vae_model.abstract_params(spec.models.vae), 2), "logvar": np.float32(0.3)}
    state = new_state(params, optax.identity(), 0, discriminator_state(variables, optax.identity()))  # no optimiser
    frozen = {}
    cfg, models, d = spec.objective.loss, spec.models, state.discriminator
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    key = jax.random.key(7)
    disc = PatchDiscriminator(spec.objective.discriminator)

    def terms(params):
        x_rec, posterior = reconstruct(models, frozen, params["vae"], x, key, True)
        nll = losses.nll_loss(losses.reconstruction_loss(x, x_rec, None, 0.0), params["logvar"])
        logits = disc.apply({"params": d.params, **d.collections}, x_rec, train=True, mutable=True)[0]
        return nll, losses.kl_loss(posterior), losses.generator_loss(logits)

    def written_out(params):
        nll_last = last_layer(jax.grad(lambda p: terms(p)[0])(params)["vae"])
        g_last = last_layer(jax.grad(lambda p: terms(p)[2])(params)["vae"])
        d_weight = cfg.disc_weight * jnp.clip(jnp.linalg.norm(nll_last) / (jnp.linalg.norm(g_last) + 1e-4), 0, 1e4)

        def total(params):
            nll, kl, g = terms(params)
            return nll + cfg.kl_weight * kl + d_weight * g

        return d_weight, *jax.value_and_grad(total)(params)

    both = jax.jit(lambda s: (generator_step(s, frozen, x, key, spec)[:3], written_out(s.params)))  # one compile
    (loss, grads, metrics), (d_weight, want_loss, want) = both(state)
    np.testing.assert_allclose(metrics["d_weight"], d_weight, rtol=1e-5)
    assert 1e-3 < float(d_weight) < 1e4 and float(metrics["disc_factor"]) == 1.0
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert set(grads) == {"vae", "logvar"}
    scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
    for (path, got), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-6 * scale, err_msg=str(path))


def test_decoder_only_trains_the_decoder_side():
    _, spec = micro_spec({"init_from": "/nowhere/vae", "autoencoder.decoder_only": True})  # abstract only
    assert set(spec.state_shardings.params["vae"]) == {"decoder", "post_quant_conv"}
    assert set(spec.state_shardings.ema_params["vae"]) == {"decoder", "post_quant_conv"}
    assert set(spec.frozen_shardings["vae"]) == {"encoder", "quant_conv"}
    assert set(spec.param_shardings) == {"vae"}  # what init_from loads: the whole VAE
    assert set(spec.param_shardings["vae"]) == {"encoder", "quant_conv", "decoder", "post_quant_conv"}


def test_the_full_size_state_from_eval_shape():
    """configs/sdxl_vae.py's state, abstractly: SDXL's VAE trained (all of it, or its decoder side), taming's
    discriminator with its running averages and Adam state, LPIPS (VGG16's convolutions + 5 heads) frozen."""
    from tests.test_train_configs import load

    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    c = load("sdxl_vae", "")
    spec = StepSpec.build(c, make_mesh(c.mesh))
    s = spec.state_shardings
    state, frozen = nn.meta.unbox(abstract_state(c, spec.models, spec.tx, spec.objective))
    assert count(state.params["vae"]) == 83_653_863 and count(state.ema_params) == 83_653_863
    batch_norms = 128 + 256 + 512  # the channels of norm_1 .. norm_3
    assert count(state.discriminator.params) == 2_765_633 and count(state.discriminator.collections) == 2 * batch_norms
    assert count(frozen["lpips"]) == 14_714_688 + 1_472 and set(frozen) == {"lpips"}
    assert jax.tree.structure(s.discriminator.opt_state) == jax.tree.structure(state.discriminator.opt_state)
    decoder = load("sdxl_vae", "decoder_only")
    spec = StepSpec.build(decoder, make_mesh(decoder.mesh))
    state, frozen = nn.meta.unbox(abstract_state(decoder, spec.models, spec.tx, spec.objective))
    assert count(state.params) + count(frozen["vae"]) == 83_653_863 and count(state.params) > count(frozen["vae"])


@pytest.mark.slow  # test budget (~30 s): CI took 12 min on a shared machine with it
def test_vae_exports_read_back_exactly(tmp_path):
    """An AutoencoderKL folder and an ldm-layout file of the same params: `load_vae_for` (what
    `Pipeline.load(vae=)` and `init_from` read) gives them back bit for bit, and diffusers reads both
    (`from_pretrained`, `from_single_file`) into the same tensors."""
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    from sdxl_jax.convert.export import export_vae_diffusers, export_vae_file, torch_state
    from sdxl_jax.convert.pipeline_weights import load_vae_for

    cfg = VAEConfig.tiny(block_out_channels=(8, 8, 16, 16), layers_per_block=1)
    params = random_tree(vae_model.abstract_params(cfg))
    export_vae_diffusers(cfg, params, tmp_path / "vae", {"source": "test"})
    export_vae_file(cfg, params, tmp_path / "vae.safetensors", {"source": "test"})
    assert json.loads((tmp_path / "vae" / "sdxl_jax_export.json").read_text())["source"] == "test"
    for path in (tmp_path / "vae", tmp_path / "vae.safetensors"):
        got_cfg, got = load_vae_for(path, cfg)
        assert got_cfg.architecture() == cfg.architecture(), path
        jax.tree.map(np.testing.assert_array_equal, got, params)
    want = torch_state("vae", cfg, params)
    folder = TorchAutoencoderKL.from_pretrained(tmp_path / "vae")
    single = TorchAutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "vae"))
    for model in (folder, single):
        have = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        assert set(have) == set(want)
        for name, value in want.items():
            np.testing.assert_array_equal(have[name], value, err_msg=name)
    assert folder.config.scaling_factor == cfg.scaling_factor and isinstance(folder, torch.nn.Module)


def test_psnr_and_ssim_equal_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from sdxl_jax.train.image_quality import psnr, ssim

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 24, 40, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    y[1] = x[1] // 2 + 60  # contrast and brightness changed
    y[2, :, :20] = x[2, :, :20]
    options = dict(data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    np.testing.assert_allclose(ssim(x, y), [structural_similarity(a, b, **options) for a, b in zip(x, y)], atol=1e-6)
    np.testing.assert_allclose(psnr(x, y), [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x, y)],
                               rtol=1e-6)  # fmt: skip
    assert float(ssim(x[:1], x[:1])[0]) == pytest.approx(1.0, abs=1e-6) and np.isinf(psnr(x[:1], x[:1]))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:, :8, :8], y[:, :8, :8])


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"autoencoder.lpips_random_vgg": False}, "needs LPIPS: set autoencoder.lpips_vgg16 and lpips_heads"),
        ({"autoencoder.loss.perceptual_weight": 0.0}, "perceptual_weight is 0 \\(LPIPS off\\)"),
        ({"autoencoder.decoder_only": True}, "decoder_only fine-tunes a trained VAE's decoder: set init_from"),
        ({"export_on_finish": "project"}, "not for an autoencoder"),
        ({"objective": "diffusion"}, "model.kind 'autoencoder' trains with objective 'autoencoder'"),
        ({"autoencoder.loss.disc_loss": "wasserstein"}, "autoencoder.loss: unknown disc_loss"),
        ({"validation.data": None}, "validation.data must be a data config"),
        ({"objective": "distillation"}, "objective 'distillation' not in"),
    ],
)
def test_bad_autoencoder_configs_fail_loudly(overrides, message):
    config = tiny_config("autoencoder")
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        check(config)


def test_the_planner_lowers_the_autoencoder_step():
    from sdxl_jax.train.memory_plan import abstract_step
    from sdxl_jax.train.step import make_train_step

    config = tiny_config("autoencoder", MICRO)
    spec, (state, frozen, batch) = abstract_step(config, {"data": 1, "fsdp": 1, "tensor": 1}, 2, 32, 32, False)
    assert isinstance(state, AdversarialState) and set(batch) == {"images"} and batch["images"].shape == (2, 32, 32, 3)
    assert set(state.discriminator.collections) == {"batch_stats"} and set(frozen) == set()
    lowered = make_train_step(spec).lower(state, frozen, batch)
    assert "d_loss" in lowered.out_info[1] and "d_weight" in lowered.out_info[1]


# ---- runs ---------------------------------------------------------------------------------------------

RUN = {"num_steps": 4, "checkpoint_every": 2, "max_checkpoints": 5}


def all_arrays(state) -> dict[str, np.ndarray]:
    """Every array of an `AdversarialState` by tree path (the discriminator and both optimisers too)."""
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.slow
def test_a_tiny_autoencoder_run_with_the_discriminator_on_early(tmp_path):
    """4 steps of `configs/tiny.py:autoencoder` (LPIPS on a random VGG16, the PatchGAN from step 3):
    the state, the metrics, validation and both exports, which hold the EMA exactly."""
    from sdxl_jax.convert.pipeline_weights import load_vae_for
    from sdxl_jax.pipeline import Pipeline
    from sdxl_jax.train.loop import train
    from tests.helpers import tiny_pipeline

    config = tiny_config("autoencoder", {"checkpoint_every": 100})
    state = train(config, tmp_path / "run")
    assert isinstance(state, AdversarialState) and set(state.params) == {"vae"} and int(state.step) == 4
    assert set(state.discriminator.params) == {f"conv_{k}" for k in range(5)} | {f"norm_{k}" for k in (1, 2, 3)}
    running_means = [np.asarray(v["mean"]) for v in state.discriminator.collections["batch_stats"].values()]
    assert len(running_means) == 3 and all(np.abs(m).max() > 0 for m in running_means)  # moved from their zeros
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    keys = {"loss", "grad_norm", "lr", "rec_loss", "l1_loss", "lpips", "kl_loss", "nll_loss", "g_loss", "d_weight",
            "disc_factor", "logvar", "d_loss", "d_grad_norm", "d_lr", "logits_real", "logits_fake", "finite",
            "updates", "skipped", "skipped_total", "ema_decay"}  # fmt: skip
    assert keys <= set(rows[0]), keys - set(rows[0])
    assert [r["disc_factor"] for r in rows] == [0, 0, 1, 1]  # disc_start 2: from the third batch (step index 2)
    assert [r["d_loss"] == 0 for r in rows] == [True, True, False, False] and rows[3]["d_weight"] > 0
    assert [r["d_grad_norm"] > 0 for r in rows] == [False, False, True, True]  # D learns from disc_start on
    assert all(r["finite"] == 1 and r["lpips"] > 0 for r in rows)
    (val,) = [json.loads(line) for line in (tmp_path / "run" / "validation" / "metrics.jsonl").read_text().splitlines()]
    assert val["step"] == 4 and 0 < val["psnr"] < 60 and -1 < val["ssim"] <= 1
    (pngs,) = [sorted((tmp_path / "run" / "validation" / "step_00000004").glob("*.png"))]
    assert len(pngs) == 4  # original | reconstruction, side by side

    ema = jax.tree.map(np.asarray, state.ema_params["vae"])
    vae_cfg = VAEConfig(**config.model.vae.to_dict())
    for path in (tmp_path / "run" / "export" / "vae", tmp_path / "run" / "export" / "vae.safetensors"):
        _, got = load_vae_for(path, vae_cfg)
        jax.tree.map(np.testing.assert_array_equal, got, ema)
    tiny_pipeline.base_pipeline().save_pretrained(tmp_path / "base")
    pipe = Pipeline.load(tmp_path / "base", dtype="fp32", vae=tmp_path / "run" / "export" / "vae")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pipe.models.vae_params), ema)


@pytest.mark.slow
def test_autoencoder_resume_is_bitwise(tmp_path):
    """2 steps, a checkpoint, 2 more in a second run: the same VAE, EMA, discriminator (params, running
    averages) and both optimiser states as 4 steps at once (the discriminator on from step 3)."""
    from sdxl_jax.train.loop import train

    fast = MICRO | {"validation.every": 0, "export_on_finish": "none"}
    straight = all_arrays(train(tiny_config("autoencoder", fast | RUN), tmp_path / "straight"))
    train(tiny_config("autoencoder", fast | RUN | {"num_steps": 2}), tmp_path / "run")
    resumed = all_arrays(train(tiny_config("autoencoder", fast | RUN), tmp_path / "run"))
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "straight")
    assert set(resumed) == set(straight) and any("discriminator" in k and "opt_state" in k for k in straight)
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
