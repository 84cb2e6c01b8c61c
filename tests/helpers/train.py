"""Running the trainer from tests on the tiny config (`configs/tiny.py`).

- `run_train`: `train(config, workdir)` in this process (the default; compiles share the session's cache);
- `run_child`: the same in a child process, for what needs one: fake multi-device meshes (the device
  count is fixed when JAX starts), several processes joined with `jax.distributed`, a kill;
- `run_train_py`: `python train.py ...` exactly as a user types it.

Both runners return `{"losses": {step: loss}, "arrays": {name: array}}`, where the arrays are the final
params, EMA, optimiser state and step, named by their tree paths (`"['params']['unet']..."`).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from sdxl_jax import storage
from tests.helpers.processes import child_env

REPO = Path(__file__).resolve().parents[2]
ONE_BUCKET = {"data.buckets": [[32, 32]]}


def tiny_config(arg: str = "", overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`configs/tiny.py:arg` with flattened overrides (`{"optimizer.name": "muon"}`)."""
    from configs.tiny import get_config

    config = get_config(arg or None)
    for key, value in (overrides or {}).items():
        config.update_from_flattened_dict({key: tuple(map(tuple, value)) if key == "data.buckets" else value})
    return config


def state_arrays(state) -> dict[str, np.ndarray]:
    """The final state as host arrays named by tree path (collective: call it on every process)."""
    from sdxl_jax.train.export import host_params

    trees = {"params": host_params(state.params), "ema": host_params(state.ema_params),
             "opt": host_params(state.opt_state), "step": np.asarray(state.step)}  # fmt: skip
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(trees)}


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def run_train(workdir: Path, overrides: dict, *, arg: str = "") -> dict:
    """`train()` in this process."""
    from sdxl_jax.train.loop import train

    state = train(tiny_config(arg, overrides), workdir)
    return {"losses": losses(workdir), "arrays": state_arrays(state)}


def run_train_py(workdir: Path, *flags: str, config: str = "configs/tiny.py", timeout: int = 600,
                 devices: int = 1) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [sys.executable, "train.py", "--config", config, "--workdir", str(workdir), *flags]
    return subprocess.run(cmd, cwd=REPO, env=child_env(devices), capture_output=True, text=True, timeout=timeout)


# `python -c CHILD CONFIG_ARG OVERRIDES_JSON WORKDIR OUT.npz` (cwd: the repo root, so `tests` imports):
# runs `train()` and saves `state_arrays` of the final state.
CHILD = """
import json, sys
import jax, numpy as np
from sdxl_jax.train.loop import train
from tests.helpers.train import state_arrays, tiny_config
arg, overrides, workdir, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
arrays = state_arrays(train(tiny_config(arg, overrides), workdir))
if jax.process_index() == 0:
    np.savez(out, **arrays)
print("CHILD DONE", flush=True)
"""


def child_command(workdir: Path, out: Path, overrides: dict, *, arg: str = "", prelude: str = "") -> list[str]:
    return [sys.executable, "-c", prelude + CHILD, arg, json.dumps(overrides), str(workdir), str(out)]


def run_child(workdir: Path, overrides: dict, *, arg: str = "", devices: int = 1, timeout: int = 600,
              extra_env: dict | None = None) -> dict:  # fmt: skip
    """`train()` in a child process with `devices` fake CPU devices; asserts success."""
    out = workdir.with_suffix(".npz")
    env = child_env(devices) | (extra_env or {})
    result = subprocess.run(child_command(workdir, out, overrides, arg=arg), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0 and "CHILD DONE" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    return {"losses": losses(workdir), "arrays": dict(np.load(out))}
