"""train.py end to end on the tiny config: one step (checkpoint, metrics, TensorBoard, export), an
overfitting run with a validation pass, and a run stopped by non-finite steps.

Runs go through subprocesses (the same command a user types) with XLA's CPU backend optimisation off
and a persistent compilation cache shared by the session, which keeps compiles short on 2 cores.
The helpers here are shared by the slow trainer tests (sharding, resume, faults, multi-process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sdxl_jax.train.tensorboard import read_events

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def train_env(cache: Path, devices: int = 1) -> dict:
    flags = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_train_py(workdir: Path, cache: Path, *flags: str, config: str = "configs/tiny.py", timeout: int = 600,
                 devices: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "--config", config, "--workdir", str(workdir), *flags]
    return subprocess.run(cmd, cwd=REPO, env=train_env(cache, devices), capture_output=True, text=True, timeout=timeout)


# A child that runs `train(config, workdir)` in-process and saves the final params and EMA (npz):
#   python -c CHILD CONFIG_ARG OVERRIDES_JSON WORKDIR OUT.npz
CHILD = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import jax, numpy as np
from configs.tiny import get_config
from sdxl_jax.train.export import host_params
from sdxl_jax.train.loop import train
arg, overrides, workdir, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
config = get_config(arg or None)
for key, value in overrides.items():
    config.update_from_flattened_dict({{key: tuple(map(tuple, value)) if key == "data.buckets" else value}})
state = train(config, workdir)
trees = {{"params": host_params(state.params), "ema": host_params(state.ema_params),
          "opt": host_params(state.opt_state), "step": np.asarray(state.step)}}
if jax.process_index() == 0:
    np.savez(out, **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(trees)}})
print("CHILD DONE", flush=True)
"""


def run_child(workdir: Path, cache: Path, overrides: dict, *, arg: str = "", devices: int = 1, timeout: int = 600,
              extra_env: dict | None = None) -> dict:
    """Run CHILD; returns {"losses": [...], "arrays": {name: array}} (the npz) and asserts success."""
    out = workdir.with_suffix(".npz")
    env = train_env(cache, devices) | (extra_env or {})
    result = subprocess.run([sys.executable, "-c", CHILD, arg, json.dumps(overrides), str(workdir), str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and "CHILD DONE" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    return {"losses": losses(workdir), "arrays": dict(np.load(out))}


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


ONE_BUCKET = {"data.buckets": [[32, 32]]}


def test_one_step_of_train_py(tmp_path, compile_cache):
    result = run_train_py(tmp_path, compile_cache, "--config.num_steps=1", "--config.export_on_finish=diffusers")
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
    export = tmp_path / "export" / "diffusers"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert any((export / part).glob("*.safetensors")), part


def test_overfits_eight_examples_and_validates(tmp_path, compile_cache):
    flags = ["--config.num_steps=40", "--config.data.num_examples=8", "--config.data.buckets=((32, 32),)",
             "--config.data.caption_dropout=0.0", "--config.checkpoint_every=1000", "--config.validation.every=40"]
    result = run_train_py(tmp_path, compile_cache, *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    loss = losses(tmp_path)
    start, end = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in range(31, 41)])
    print(f"loss {start:.3f} -> {end:.3f}")
    assert end < 0.45 * start, (start, end)
    images = sorted((tmp_path / "validation" / "step_00000040").glob("*.png"))
    assert len(images) == 2
    from PIL import Image

    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run(tmp_path, compile_cache):
    # An absurd learning rate sends the params to inf after one update: every later step is non-finite.
    flags = ["--config.num_steps=8", "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
             "--config.optimizer.grad_clip_norm=1e30", "--config.max_consecutive_skips=3", "--config.checkpoint_every=100"]
    result = run_train_py(tmp_path, compile_cache, *flags)
    assert result.returncode != 0
    assert "3 consecutive non-finite losses or gradients" in result.stderr, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["finite"] == 0]
    assert [r["skipped"] for r in skipped] == [1, 2, 3] and skipped[-1]["skipped_total"] == 3
    assert {r["updates"] for r in skipped} == {skipped[0]["updates"]}  # no update while skipping


@pytest.mark.slow
def test_training_the_text_encoders(tmp_path, compile_cache):
    got = run_child(tmp_path / "run", compile_cache, ONE_BUCKET | {"num_steps": 2, "train_text_encoders": True,
                                                                    "checkpoint_every": 100})
    text = [n for n in got["arrays"] if n.startswith("['params']['text_encoder")]
    assert any("['text_encoder']" in n for n in text) and any("['text_encoder_2']" in n for n in text)
    # the text encoders moved (by about their own, smaller LR: 1e-5 x warmup 0.5 at step 2)
    ema = {n: got["arrays"][n.replace("['params']", "['ema']", 1)] for n in text}
    moved = max(float(np.abs(got["arrays"][n] - ema[n]).max()) for n in text)
    assert 0 < moved < 1e-4, moved


@pytest.mark.slow
def test_single_file_export_holds_the_ema_unet(tmp_path, compile_cache):
    from configs.tiny import tiny_models
    from sdxl_jax.convert import SingleFileLayout, load_single_file
    from sdxl_jax.convert.export import architecture

    got = run_child(tmp_path / "run", compile_cache, ONE_BUCKET | {"num_steps": 2, "checkpoint_every": 100,
                                                                    "export_on_finish": "single_file"})
    models = tiny_models(refiner=False)
    layout = SingleFileLayout(*(architecture(models.config(n)) for n in ("unet", "vae", "text_encoder", "text_encoder_2")))
    weights = load_single_file(tmp_path / "run" / "export" / "sdxl.safetensors", layout=layout)
    assert weights.model == "base"
    flat = {jax.tree_util.keystr(path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(weights.params("unet"))}
    ema = {k[len("['ema']['unet']"):]: v for k, v in got["arrays"].items() if k.startswith("['ema']['unet']")}
    params = {k[len("['params']['unet']"):]: v for k, v in got["arrays"].items() if k.startswith("['params']['unet']")}
    assert set(flat) == set(ema) and len(ema) > 50
    for name, value in ema.items():
        np.testing.assert_array_equal(flat[name], value, err_msg=name)
    assert any(not np.array_equal(ema[n], params[n]) for n in ema)  # it is the EMA, not the raw params



@pytest.mark.slow
def test_grain_loader_feeds_the_trainer_and_resumes(tmp_path, compile_cache):
    from PIL import Image

    from sdxl_jax.data.synthetic import caption_text, render

    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(render(i, 40 + 4 * i, 48)).save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(caption_text(i))
    overrides = {"data.path": str(images), "num_steps": 2, "checkpoint_every": 2}
    run_child(tmp_path / "run", compile_cache, overrides, arg="folder")
    state = json.loads((tmp_path / "run" / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
    assert state  # grain's own iterator state, saved with the train state
    resumed = run_child(tmp_path / "run", compile_cache, overrides | {"num_steps": 3}, arg="folder")
    straight = run_child(tmp_path / "straight", compile_cache, overrides | {"num_steps": 3}, arg="folder")
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == 3


@pytest.mark.slow
def test_project_export_records_the_objective_and_never_overwrites(tmp_path, compile_cache):
    from sdxl_jax.convert import load_pipeline_weights
    from sdxl_jax.pipeline import Pipeline

    overrides = ONE_BUCKET | {"num_steps": 1, "checkpoint_every": 100, "export_on_finish": "project",
                              "diffusion.prediction": "v_prediction", "diffusion.zero_terminal_snr": True}
    run_child(tmp_path / "run", compile_cache, overrides)
    first = tmp_path / "run" / "export" / "sdxl_jax"
    weights = load_pipeline_weights(first)
    assert weights.metadata["prediction"] == "v_prediction" and weights.metadata["zero_terminal_snr"] == "true"
    assert "step 1" in weights.metadata["source"]
    run_child(tmp_path / "run", compile_cache, overrides | {"num_steps": 2})  # resumed, extended: a second export
    assert "step 1" in load_pipeline_weights(first).metadata["source"]  # the first one kept
    assert "step 2" in load_pipeline_weights(tmp_path / "run" / "export" / "sdxl_jax-step2").metadata["source"]
    pipe = Pipeline.load(first, dtype="fp32")
    assert pipe.models.base.prediction == "v_prediction" and pipe.table.alphas_cumprod[-1] < 1e-6
