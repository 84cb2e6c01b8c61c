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


def test_a_lora_run_trains_the_adapters_alone_resumes_exactly_and_exports_what_it_trained(tmp_path):
    from sdxl_jax.train.loop import train

    config = tiny_config("lora", ONE_BUCKET | {"num_steps": 4, "checkpoint_every": 2})
    models = tiny_models(refiner=False)
    state = train(config, tmp_path / "run")

    # the state: adapters on the targeted kernels of the UNet and both text encoders, nothing else
    spec = lora.spec_from_config(config.lora)
    base = jax.jit(lambda: nn.meta.unbox(init_params(models, jax.random.key(config.seed))))()
    kernels, _ = lora.target_kernels(models, spec, ("unet", "text_encoder", "text_encoder_2"), base)
    flat = lora.flat_adapters(state.params)
    assert set(flat) == set(kernels) and len(flat) == 72  # 4 transformers x 12 + 2 x 2 text layers x 6
    untrained = {n for n, a in flat.items() if not np.asarray(a["up"]).any()}
    # every adapter trained but those of CLIP-L's last layer: SDXL reads its penultimate hidden state
    assert untrained == {n for n in flat if n.startswith("text_encoder/layers_1/")} and len(untrained) == 6
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt <= 2 * n_adapter + 10  # Adam's two moments (and counters): of the adapters alone
    saved = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints" / "4").rglob("*") if f.is_file())
    n_whole = sum(x.size for n in ("unet", "text_encoder", "text_encoder_2") for x in jax.tree.leaves(base[n]))
    assert saved < 0.1 * 16 * n_whole  # a full fine-tune's holds params, two moments and EMA: 16 bytes a param

    # the exported kohya file, merged into the base weights, is the model the run trained (EMA adapters)
    (file,) = (tmp_path / "run" / "export").iterdir()
    assert file.name == "lora.safetensors"
    host = jax.tree.map(np.asarray, base)
    weights = merge_loras(PipelineWeights("base", {n: (models.config(n), host[n]) for n in models.components}),
                          [(file, 1.0)])  # fmt: skip
    want = model_params(base, state.ema_params, spec)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for a, b in zip(jax.tree.leaves(weights.params(name)), jax.tree.leaves(want[name]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(base)))

    # resume: drop the last checkpoint and the export, run again from step 2 to the same adapters
    straight = state_arrays(state)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "run" / "export")
    resumed = state_arrays(train(config, tmp_path / "run"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)


def test_adapters_on_a_scanned_unet_merge_and_unstack_as_on_an_unscanned_one():
    """Full-size configs scan the transformer blocks: their adapters are stacked like their kernels."""
    models = tiny_models(refiner=False)
    scanned = dataclasses.replace(models, unet=models.unet.replace(scan_layers=True))
    spec = lora.LoraSpec(rank=2, alpha=3.0, targets="conv", conv_rank=1)
    params = jax.jit(lambda: nn.meta.unbox(init_params(models, jax.random.key(0))))()
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


def test_rank_dropout_keeps_the_expected_merge():
    """Dropped rank components are scaled back up: the merge is unbiased over draws."""
    models = tiny_models(refiner=False)
    spec = lora.LoraSpec(rank=8, alpha=8.0, targets="attention")
    params = jax.jit(lambda: nn.meta.unbox(init_params(models, jax.random.key(0))))()
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
