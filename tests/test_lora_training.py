"""LoRA training in the one trainer: the adapters are the whole train state, they merge into the frozen
kernels inside the step, resume exactly, and leave as a LoRA file that merges into the base weights to
the model the run trained (here and, in the slow test, in diffusers)."""

import dataclasses
import shutil

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.tiny import tiny_models
from sdxl_jax.convert.lora import merge_loras
from sdxl_jax.convert.pipeline_weights import PipelineWeights
from sdxl_jax.convert.unet import stack_scanned_blocks
from sdxl_jax.train import lora
from sdxl_jax.train.config import check
from sdxl_jax.train.state import abstract_params, init_params, model_params
from tests.helpers.train import ONE_BUCKET, state_arrays, tiny_config


def random_up(adapters, seed=1):
    """Adapters with random `up` (fresh ones are zero: the merge would be the identity)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(0, 0.1, x.shape).astype(np.float32) if p[-1].key == "up" else x, adapters
    )


@pytest.fixture(scope="module")
def base():
    """The tiny base model's params as a run with seed 0 initialises them."""
    return jax.jit(lambda: nn.meta.unbox(init_params(tiny_models(refiner=False), jax.random.key(0))))()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 4-step tiny:lora run (checkpoints at 2 and 4, kohya file exported): (config, workdir, state)."""
    from sdxl_jax.train.loop import train

    config = tiny_config("lora", ONE_BUCKET | {"num_steps": 4, "checkpoint_every": 2})
    workdir = tmp_path_factory.mktemp("lora") / "run"
    return config, workdir, train(config, workdir)


@pytest.mark.slow  # test budget (~60 s); train.py trains and exports a LoRA in test_train_run by default
def test_a_lora_run_trains_the_adapters_alone_and_exports_what_it_trained(lora_run, base):
    config, workdir, state = lora_run
    models = tiny_models(refiner=False)
    assert config.seed == 0

    # the state: adapters on the targeted kernels of the UNet and both text encoders, nothing else
    spec = lora.spec_from_config(config.lora)
    kernels, _ = lora.target_kernels(models, spec, ("unet", "text_encoder", "text_encoder_2"), base)
    flat = lora.flat_adapters(state.params)
    assert set(flat) == set(kernels) and len(flat) == 72  # 4 transformers x 12 + 2 x 2 text layers x 6
    untrained = {n for n, a in flat.items() if not np.asarray(a["up"]).any()}
    # every adapter trained but those of CLIP-L's last layer: SDXL reads its penultimate hidden state
    assert untrained == {n for n in flat if n.startswith("text_encoder/layers_1/")} and len(untrained) == 6
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt <= 2 * n_adapter + 10  # Adam's two moments (and counters): of the adapters alone
    saved = sum(f.stat().st_size for f in (workdir / "checkpoints" / "4").rglob("*") if f.is_file())
    n_whole = sum(x.size for n in ("unet", "text_encoder", "text_encoder_2") for x in jax.tree.leaves(base[n]))
    assert saved < 0.1 * 16 * n_whole  # a full fine-tune's holds params, two moments and EMA: 16 bytes a param

    # the exported kohya file, merged into the base weights, is the model the run trained (EMA adapters)
    (file,) = (workdir / "export").iterdir()
    assert file.name == "lora.safetensors"
    host = jax.tree.map(np.asarray, base)
    weights = merge_loras(PipelineWeights("base", {n: (models.config(n), host[n]) for n in models.components}),
                          [(file, 1.0)])  # fmt: skip
    want = model_params(base, state.ema_params, spec)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for a, b in zip(jax.tree.leaves(weights.params(name)), jax.tree.leaves(want[name]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(base)))


@pytest.mark.slow  # a second run (~30 s); resume itself is the trainer's, tested for full fine-tunes
def test_a_lora_run_resumes_bitwise(lora_run, tmp_path):
    """Drop the last checkpoint and the export, run again: it resumes at step 2 and ends on the same state."""
    from sdxl_jax.train.loop import train

    config, workdir, state = lora_run
    shutil.copytree(workdir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "run" / "export")
    straight, resumed = state_arrays(state), state_arrays(train(config, tmp_path / "run"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    assert (tmp_path / "run" / "export" / "lora.safetensors").exists()


def test_adapters_on_a_scanned_unet_merge_and_unstack_as_on_an_unscanned_one(base):
    """Full-size configs scan the transformer blocks: their adapters are stacked like their kernels."""
    models = tiny_models(refiner=False)
    scanned = dataclasses.replace(models, unet=models.unet.replace(scan_layers=True))
    spec = lora.LoraSpec(rank=2, alpha=3.0, targets="conv", conv_rank=1)
    params = base
    adapters = random_up(lora.init_lora(models, spec, ("unet",), params, jax.random.key(1)))
    stacked = {"unet": stack_scanned_blocks(adapters["unet"])}
    fresh = lora.init_lora(scanned, spec, ("unet",), abstract_params(scanned), jax.random.key(1))
    assert set(lora.flat_adapters(fresh)) == set(lora.flat_adapters(stacked))
    want = model_params(params, adapters, spec)["unet"]
    got = model_params(params | {"unet": stack_scanned_blocks(params["unet"])}, stacked, spec)["unet"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(stack_scanned_blocks(want)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    back = lora.unstacked(stacked)["unet"]
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapters["unet"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # LoCon: 3x3 kernels at conv_rank, the rest at rank
    ranks = {name: a["down"].shape[-1] for name, a in lora.flat_adapters(adapters).items()}
    assert {r for n, r in ranks.items() if "conv1" in n} == {1} and ranks[
        "unet/down_blocks_1/attentions_0/proj_in/kernel"
    ] == 2


def test_rank_dropout_keeps_the_expected_merge(base):
    """Dropped rank components are scaled back up: the merge is unbiased over draws."""
    models = tiny_models(refiner=False)
    spec = lora.LoraSpec(rank=8, alpha=8.0, targets="attention")
    params = base
    adapters = random_up(lora.init_lora(models, spec, ("unet",), params, jax.random.key(1)))
    path = ("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
    pick = lambda p: flax.traverse_util.flatten_dict(p["unet"])[path]
    full = pick(model_params(params, adapters, spec)) - pick(params)
    draws = [
        pick(model_params(params, adapters, spec, dropout=0.5, key=jax.random.key(i))) - pick(params)
        for i in range(200)
    ]
    assert not np.allclose(draws[0], full)  # a draw drops components
    np.testing.assert_allclose(np.mean(draws, 0), full, atol=0.15 * np.abs(full).max())


def test_bad_lora_configs_fail_loudly():
    c = tiny_config("lora")
    c.lora.update(targets="everything", dropout=1.0, text_encoders="text_encoder_3", format="peft")
    c.train_text_encoders = True
    c.optimizer.name = "muon"
    with pytest.raises(ValueError) as e:
        check(c)
    for part in ("lora targets 'everything'", "lora.dropout must be in [0, 1)", "train_text_encoders",
                 "adamw", "lora.format 'peft'"):  # fmt: skip
        assert part in str(e.value)
    c = tiny_config("")
    c.export_on_finish = "lora"
    with pytest.raises(ValueError, match="export_on_finish=lora needs lora.rank > 0"):
        check(c)
    c = tiny_config("lora,refiner")
    c.lora.text_encoders = "text_encoder"
    from sdxl_jax.train.state import trainable_components

    with pytest.raises(ValueError, match="this refiner has no text_encoder"):
        trainable_components(c, tiny_models(refiner=True))


@pytest.mark.slow  # two tiny trainings from a diffusers folder and diffusers' own LoRA loading (~1 min)
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_trained_lora_loaded_by_diffusers_gives_the_outputs_of_the_model_it_trained(tmp_path, fmt):
    """Train LoCon adapters on the UNet and both text encoders of a tiny diffusers pipeline, export the
    file (`export_on_finish=lora`), load it with diffusers' `load_lora_weights` (PEFT layers, unfused):
    the UNet's and text encoders' outputs equal this project's models with the trained adapters merged."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdxl_jax.conditioning import vector_conditioning
    from sdxl_jax.convert import load_pipeline_weights
    from sdxl_jax.models import CLIPTextModel, UNet
    from sdxl_jax.train.config import model_entries
    from sdxl_jax.train.loop import train
    from sdxl_jax.train.state import Models, load_params
    from tests.helpers import tiny_pipeline
    from tests.helpers.torch_reference import from_nchw, to_nchw

    tiny_pipeline.base_pipeline().save_pretrained(tmp_path / "base", safe_serialization=True)
    weights = load_pipeline_weights(tmp_path / "base")
    models = Models("base", *(weights.config(n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")))
    config = tiny_config("lora", {"num_steps": 3, "checkpoint_every": 3, "data.buckets": [[32, 32]]})
    config.model = model_entries(models)
    config.data.update(context_dim=models.unet.context_dim, pooled_dim=models.text_encoder_2.projection_dim)
    config.init_from = str(tmp_path / "base")
    config.lora.update(targets="conv", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, format=fmt)
    config.optimizer.update(learning_rate=1e-2, text_encoder_learning_rate=1e-2, warmup_steps=0)
    config.export_ema = False  # the last adapters: they moved furthest from the base
    state = train(config, tmp_path / "run")
    (file,) = (tmp_path / "run" / "export").iterdir()
    assert file.name == {"kohya": "lora.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}[fmt]

    base = load_params(models, str(tmp_path / "base"))
    ours = model_params(base, state.params, lora.spec_from_config(config.lora))
    theirs = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999.0, 250.0], np.float32)
    ctx = rng.standard_normal((2, 7, models.unet.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, models.text_encoder_2.projection_dim)).astype(np.float32)
    ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 0, 832, 1216]], np.float32)
    ids_text = np.array([[49406, 320, 1125, 49407] + [49407] * 73, [49406, 320, 49407] + [0] * 74], np.int32)

    def unet_outputs(params_unet, pipe):
        y = vector_conditioning(pooled, ids, models.unet.time_id_embed_dim)
        out = UNet(models.unet).apply({"params": params_unet}, x, t, ctx, y)
        kwargs = dict(added_cond_kwargs=dict(text_embeds=torch.from_numpy(pooled), time_ids=torch.from_numpy(ids)))
        with torch.no_grad():
            ref = from_nchw(pipe.unet(to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample)
        return np.asarray(out), ref

    def text_outputs(name, params, pipe):
        out = CLIPTextModel(models.config(name)).apply({"params": params}, ids_text)
        with torch.no_grad():
            ref = getattr(pipe, name)(torch.from_numpy(ids_text).long(), output_hidden_states=True)
        return np.asarray(out.hidden_states[-2]), ref.hidden_states[-2].numpy()

    plain_unet, _ = unet_outputs(base["unet"], theirs)
    theirs.load_lora_weights(str(file))
    got, want = unet_outputs(ours["unet"], theirs)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    assert np.abs(got - plain_unet).max() > 1e-3 * scale  # the LoRA changed the UNet's output
    for name in ("text_encoder", "text_encoder_2"):
        got, want = text_outputs(name, ours[name], theirs)
        plain, _ = text_outputs(name, base[name], theirs)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)
        assert np.abs(got - plain).max() > 1e-3 * np.abs(want).max(), name


def test_a_lora_runs_state_is_the_adapters_laid_out_with_their_kernels():
    """The spec of a LoRA run, from eval_shape alone: the state holds adapters (boxed with their kernels'
    logical axes, so they shard with them), the frozen params every component whole."""
    from sdxl_jax.sharding import make_mesh
    from sdxl_jax.train.state import abstract_trained_and_frozen, models_from_config
    from sdxl_jax.train.step import StepSpec

    config = tiny_config("lora")
    spec = StepSpec.build(config, make_mesh(config.mesh))
    assert set(spec.frozen_shardings) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert set(spec.state_shardings.params) == {"unet", "text_encoder", "text_encoder_2"}
    adapters, _ = abstract_trained_and_frozen(config, models_from_config(config.model))
    flat = lora.flat_adapters(adapters)
    q = flat["unet/down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel"]
    assert q["down"].names == ("embed", None) and q["up"].names == (None, "heads")
    assert jax.tree.structure(spec.state_shardings.params) == jax.tree.structure(nn.meta.unbox(adapters))
