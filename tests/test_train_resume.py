"""Checkpoints and faults: exact (bitwise) resume, a kill -9 in the middle of an async save, SIGTERM."""

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from sdxl_jax.train.loop import train
from tests.helpers.processes import child_env
from tests.helpers.train import REPO, child_command, losses, run_train, tiny_config

COMMON = {"num_steps": 6, "checkpoint_every": 2, "max_checkpoints": 5}  # two buckets, alternating


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp("straight") / "run", COMMON)


def assert_bitwise(got: dict, want: dict, steps):
    assert [got["losses"][s] for s in steps] == [want["losses"][s] for s in steps]
    assert set(got["arrays"]) == set(want["arrays"])
    for name, value in want["arrays"].items():
        np.testing.assert_array_equal(got["arrays"][name], value, err_msg=name)


@pytest.mark.slow
def test_resume_is_bitwise(tmp_path, straight):
    run_train(tmp_path / "run", COMMON | {"num_steps": 3, "checkpoint_every": 3})
    resumed = run_train(tmp_path / "run", COMMON | {"checkpoint_every": 3})
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3", "6"]
    assert_bitwise(resumed, straight, range(1, 7))  # params, EMA, optimiser state, step; losses 4-6 after resume


@pytest.mark.slow
def test_resume_with_muon_is_bitwise(tmp_path):
    """Muon's state holds masked-out entries (the params AdamW takes); they checkpoint and restore too."""
    muon = COMMON | {"optimizer.name": "muon"}
    want = run_train(tmp_path / "straight", muon)
    run_train(tmp_path / "run", muon | {"num_steps": 3, "checkpoint_every": 3})
    resumed = run_train(tmp_path / "run", muon | {"checkpoint_every": 3})
    assert_bitwise(resumed, want, range(1, 7))


# Orbax's commit of step 4 (the rename of its temporary folder into `4/`, in the background save
# thread) is held back, so the kill lands while step 4 is written but not committed.
HOLD_STEP_4 = """
import asyncio, pathlib, sys
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def held(self):
    if pathlib.Path(self._final_path).name == "4":
        pathlib.Path(sys.argv[3] + ".holding").write_text("4")
        await asyncio.sleep(600)
    return await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = held
"""


@pytest.mark.slow
def test_kill_during_async_save_falls_back_to_the_newest_complete_checkpoint(tmp_path, straight):
    workdir = tmp_path / "run"
    cmd = child_command(workdir, tmp_path / "x.npz", COMMON, prelude=HOLD_STEP_4)
    child = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = workdir.parent / "run.holding"
    deadline = time.time() + 600
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), child.communicate()[0].decode()[-3000:]
    time.sleep(1.0)  # let the step-4 writes proceed too
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    entries = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "2" in entries and "4" not in entries and any(name.startswith("4.") for name in entries), entries

    resumed = run_train(workdir, COMMON)
    log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log][-4:] == [3, 4, 5, 6]  # the second run started after step 2
    assert_bitwise(resumed | {"losses": losses(workdir)}, straight, range(3, 7))


@pytest.mark.slow
def test_sigterm_saves_and_stops(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"

    def terminate_after_three_steps():  # the signal reaches the training loop on the main thread
        deadline = time.time() + 600
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=terminate_after_three_steps, daemon=True)
    watcher.start()
    config = tiny_config("", {"num_steps": 100000, "checkpoint_every": 100000, "export_on_finish": "diffusers"})
    train(config, tmp_path)
    watcher.join()
    assert "SIGTERM, saving and stopping" in capsys.readouterr().out
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [str(last)]
    data_state = tmp_path / "checkpoints" / str(last) / "data" / "process_0-of-1.json"
    assert json.loads(data_state.read_text())["next_batch"] == last
    assert not (tmp_path / "export").exists()  # an unfinished run is not exported
    # ... and the next start continues from there
    train(tiny_config("", {"num_steps": last + 1, "checkpoint_every": 100000}), tmp_path)
    out = capsys.readouterr().out
    assert f"resumed at step {last}" in out and f"step {last + 1}/{last + 1}" in out
