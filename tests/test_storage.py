"""Runs on buckets: URL checks, fail-fast probes, append and upload semantics, and `gs://` end to end
against a local GCS emulator (`tests/helpers/gcs_emulator.py` on loopback; gcsfs and TensorStore pointed
at it by STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL)."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sdxl_jax import storage
from tests.helpers.processes import child_env, free_port
from tests.helpers.train import REPO, run_train


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator with the bucket `bucket`; its settings in this process's environment (and so in
    `child_env()`'s) for the module's duration."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.helpers.gcs_emulator", str(port)]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the GCS emulator did not start") from None
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.terminate()
    server.wait(10)


def test_urls_are_checked():
    with pytest.raises(storage.StorageError, match=r"did you mean gs://bucket/run"):
        storage.path("gs:/bucket/run")  # what pathlib makes of gs://bucket/run
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.path("gs://")
    with pytest.raises(storage.StorageError, match="unknown storage scheme ftp"):
        storage.path("ftp://host/x")
    assert not storage.is_remote(storage.path("runs/x")) and storage.is_remote(storage.path("gs://b/x"))
    assert str(storage.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"


def test_an_unwritable_local_location_fails_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(storage.StorageError, match=r"^--workdir .*/file/run is not usable: "):
        storage.check_writable(tmp_path / "file" / "run", "--workdir")
    assert storage.check_writable(tmp_path / "ok", "--workdir").is_dir()
    assert list((tmp_path / "ok").iterdir()) == []  # the probe is gone


def test_append_file_and_upload_tree_on_a_bucket(gcs, tmp_path):
    log = storage.AppendFile("gs://bucket/t/metrics.jsonl")
    log.write('{"step": 1}\n')
    log.flush()
    assert storage.path("gs://bucket/t/metrics.jsonl").read_text() == '{"step": 1}\n'
    log.close()
    again = storage.AppendFile("gs://bucket/t/metrics.jsonl")  # a resumed run continues the file
    again.write('{"step": 2}\n')
    again.close()
    assert storage.path("gs://bucket/t/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'

    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "index.json").write_text("{}")
    (tmp_path / "out" / "sub" / "a.bin").write_bytes(b"\x00" * 1000)
    storage.upload_tree(tmp_path / "out", "gs://bucket/t/out", last=("index.json",))
    assert storage.path("gs://bucket/t/out/sub/a.bin").read_bytes() == b"\x00" * 1000
    with pytest.raises(FileExistsError):
        storage.upload_tree(tmp_path / "out", "gs://bucket/t/out")


def test_a_missing_bucket_stops_train_py_in_one_line(gcs):
    start = time.monotonic()
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", "gs://no-such-bucket/run"]
    result = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: --workdir gs://no-such-bucket/run is not usable"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert seconds < 60, seconds  # before any compile (imports take most of it)


@pytest.mark.slow
def test_train_resume_export_sample_and_convert_on_a_bucket(gcs, tmp_path):
    common = {"num_steps": 3, "checkpoint_every": 1, "max_checkpoints": 5}
    straight = run_train(tmp_path / "local", common)
    run = "gs://bucket/run"
    run_train(run, common | {"num_steps": 2})  # stops after its step-2 checkpoint, as a killed run would
    resumed = run_train(run, common | {"export_on_finish": "project"})
    assert resumed["losses"] == straight["losses"]
    for name, value in straight["arrays"].items():
        np.testing.assert_array_equal(resumed["arrays"][name], value, err_msg=name)
    bucket = storage.path(run)
    assert sorted(p.name for p in (bucket / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert (bucket / "config.json").exists()
    from sdxl_jax.train.tensorboard import read_events

    files = list((bucket / "tensorboard").iterdir())  # one per run: the first and the resumed one
    assert len(files) == 2
    assert {e["step"] for f in files for e in read_events(f) if e.get("scalars")} == {1, 2, 3}
    assert (bucket / "export" / "sdxl_jax" / "sdxl_jax.json").exists()

    sample = [sys.executable, "sample.py", "--config", "configs/sdxl_base.py",
              f"--config.checkpoint={run}/export/sdxl_jax", "--prompt", "a red cube", "--steps", "2",
              "--outdir", "gs://bucket/out", "--config.compilation_cache=none"]  # fmt: skip
    result = subprocess.run(sample, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in storage.path("gs://bucket/out").iterdir()] == ["00000000.png"]

    # sdxl-convert from the bucket into it (a diffusers folder, uploaded with model_index.json last), and
    # back out of it (its safetensors read by ranged reads) into a local project checkpoint
    convert = [
        sys.executable,
        "-m",
        "sdxl_jax.convert",
        f"{run}/export/sdxl_jax",
        "gs://bucket/diffusers",
        "--to",
        "diffusers",
    ]
    result = subprocess.run(convert, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    back = [sys.executable, "-m", "sdxl_jax.convert", "gs://bucket/diffusers", str(tmp_path / "back")]
    result = subprocess.run(back, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from sdxl_jax.convert.pipeline_weights import load_project

    exported, local = load_project(f"{run}/export/sdxl_jax"), load_project(tmp_path / "back")
    for name, (_, params) in exported.components.items():
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(local.params(name)), strict=True):
            np.testing.assert_array_equal(a, b)
