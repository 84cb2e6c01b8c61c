"""The trainer end to end on the tiny config: `python train.py` for one step (checkpoint, metrics,
TensorBoard, export), then `train()` in-process: an overfitting run with a validation pass, a run stopped
by non-finite steps, trained text encoders, and each export format.
"""

import json

import jax
import numpy as np
import pytest

from sdxl_jax.train.loop import train
from sdxl_jax.train.tensorboard import read_events
from tests.helpers.train import ONE_BUCKET, run_train, run_train_py, tiny_config


def test_one_step_of_train_py(tmp_path):
    """One LoRA step (configs/tiny.py:lora), as cheap as a full one and it covers the adapters' path too."""
    result = run_train_py(tmp_path, "--config.num_steps=1", config="configs/tiny.py:lora")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "step 1/1 loss" in result.stdout
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and 0.2 < row["loss"] < 5 and row["updates"] == 1 and row["finite"] == 1
    assert row["lr"] == 0.0  # first warmup step
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert (tmp_path / "checkpoints" / "1" / "data" / "process_0-of-1.json").read_text().startswith('{"next_batch": 1')
    (events,) = (tmp_path / "tensorboard").iterdir()
    scalars = [e for e in read_events(events) if e["scalars"]]
    assert scalars[0]["step"] == 1 and scalars[0]["scalars"]["train/loss"] == np.float32(row["loss"])
    assert scalars[0]["scalars"]["buckets/32x32"] == 1
    from safetensors import safe_open

    with safe_open(tmp_path / "export" / "lora.safetensors", "np") as f:  # the adapters as kohya writes them
        keys, header = set(f.keys()), f.metadata()
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te1", "te2"}
    assert len([k for k in keys if k.endswith(".alpha")]) == 72 and header["ss_network_dim"] == "4"


def test_overfits_eight_examples_and_validates(tmp_path):
    overrides = ONE_BUCKET | {
        "num_steps": 40,
        "data.num_examples": 8,
        "data.caption_dropout": 0.0,
        "checkpoint_every": 1000,
        "validation.every": 40,
    }
    loss = run_train(tmp_path, overrides)["losses"]
    start, end = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in range(31, 41)])
    print(f"loss {start:.3f} -> {end:.3f}")
    assert end < 0.45 * start, (start, end)
    images = sorted((tmp_path / "validation" / "step_00000040").glob("*.png"))
    assert len(images) == 2
    from PIL import Image

    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    # An absurd learning rate sends the params to inf after one update: every later step is non-finite.
    config = tiny_config(
        "",
        {
            "num_steps": 8,
            "optimizer.learning_rate": 1e30,
            "optimizer.warmup_steps": 0,
            "optimizer.grad_clip_norm": 1e30,
            "max_consecutive_skips": 3,
            "checkpoint_every": 100,
        },
    )
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses or gradients"):
        train(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["finite"] == 0]
    assert [r["skipped"] for r in skipped] == [1, 2, 3] and skipped[-1]["skipped_total"] == 3
    assert {r["updates"] for r in skipped} == {skipped[0]["updates"]}  # no update while skipping


@pytest.mark.slow
def test_training_the_text_encoders(tmp_path):
    overrides = ONE_BUCKET | {"num_steps": 2, "train_text_encoders": True, "checkpoint_every": 100}
    got = run_train(tmp_path / "run", overrides)
    text = [n for n in got["arrays"] if n.startswith("['params']['text_encoder")]
    assert any("['text_encoder']" in n for n in text) and any("['text_encoder_2']" in n for n in text)
    # the text encoders moved (by about their own, smaller LR: 1e-5 x warmup 0.5 at step 2)
    ema = {n: got["arrays"][n.replace("['params']", "['ema']", 1)] for n in text}
    moved = max(float(np.abs(got["arrays"][n] - ema[n]).max()) for n in text)
    assert 0 < moved < 1e-4, moved


@pytest.mark.slow
def test_single_file_export_holds_the_ema_unet(tmp_path):
    from configs.tiny import tiny_models
    from sdxl_jax.convert import SingleFileLayout, load_single_file
    from sdxl_jax.convert.export import architecture

    got = run_train(
        tmp_path / "run", ONE_BUCKET | {"num_steps": 2, "checkpoint_every": 100, "export_on_finish": "single_file"}
    )
    models = tiny_models(refiner=False)
    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    layout = SingleFileLayout(*(architecture(models.config(n)) for n in components))
    weights = load_single_file(tmp_path / "run" / "export" / "sdxl.safetensors", layout=layout)
    assert weights.model == "base"
    leaves = jax.tree_util.tree_leaves_with_path(weights.params("unet"))
    flat = {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}
    ema = {k[len("['ema']['unet']") :]: v for k, v in got["arrays"].items() if k.startswith("['ema']['unet']")}
    params = {k[len("['params']['unet']") :]: v for k, v in got["arrays"].items() if k.startswith("['params']['unet']")}
    assert set(flat) == set(ema) and len(ema) > 50
    for name, value in ema.items():
        np.testing.assert_array_equal(flat[name], value, err_msg=name)
    assert any(not np.array_equal(ema[n], params[n]) for n in ema)  # it is the EMA, not the raw params


@pytest.mark.slow
def test_grain_loader_feeds_the_trainer_and_resumes(tmp_path):
    from PIL import Image

    from sdxl_jax.data.synthetic import caption_text, render

    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(render(i, 40 + 4 * i, 48)).save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(caption_text(i))
    overrides = {"data.path": str(images), "num_steps": 2, "checkpoint_every": 2}
    run_train(tmp_path / "run", overrides, arg="folder")
    state = json.loads((tmp_path / "run" / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
    assert state  # grain's own iterator state, saved with the train state
    resumed = run_train(tmp_path / "run", overrides | {"num_steps": 3}, arg="folder")
    straight = run_train(tmp_path / "straight", overrides | {"num_steps": 3}, arg="folder")
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == 3


@pytest.mark.slow
def test_project_export_records_the_objective_and_never_overwrites(tmp_path):
    from sdxl_jax.convert import load_pipeline_weights
    from sdxl_jax.pipeline import Pipeline

    overrides = ONE_BUCKET | {
        "num_steps": 1,
        "checkpoint_every": 100,
        "export_on_finish": "project",
        "diffusion.prediction": "v_prediction",
        "diffusion.zero_terminal_snr": True,
    }
    run_train(tmp_path / "run", overrides)
    first = tmp_path / "run" / "export" / "sdxl_jax"
    weights = load_pipeline_weights(first)
    assert weights.metadata["prediction"] == "v_prediction" and weights.metadata["zero_terminal_snr"] == "true"
    assert "step 1" in weights.metadata["source"]
    run_train(tmp_path / "run", overrides | {"num_steps": 2})  # resumed, extended: a second export
    assert "step 1" in load_pipeline_weights(first).metadata["source"]  # the first one kept
    assert "step 2" in load_pipeline_weights(tmp_path / "run" / "export" / "sdxl_jax-step2").metadata["source"]
    pipe = Pipeline.load(first, dtype="fp32")
    assert pipe.models.base.prediction == "v_prediction" and pipe.table.alphas_cumprod[-1] < 1e-6
