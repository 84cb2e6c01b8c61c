"""Multi-host on one machine: 2 processes x 4 fake CPU devices joined with `jax.distributed` (gloo
collectives over loopback) train like one process with 8 devices; their checkpoint restores in a
single process."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train_run import CHILD, ONE_BUCKET, REPO, compile_cache, losses, run_child, train_env  # noqa: F401  (fixture)

COMMON = ONE_BUCKET | {"num_steps": 3, "checkpoint_every": 3, "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1}

RESTORE = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import jax, numpy as np
from configs.tiny import get_config
from sdxl_jax.train import checkpoint
from sdxl_jax.train.export import host_params
from sdxl_jax.train.state import create_sharded_state
from sdxl_jax.train.step import StepSpec
from sdxl_jax.sharding import make_mesh
config = get_config()
config.mesh.fsdp = 1
state, _ = create_sharded_state(StepSpec.build(config, make_mesh(config.mesh)))
manager = checkpoint.make_manager(sys.argv[1] + "/checkpoints", config)
restored = checkpoint.restore(manager, manager.latest_step(), state)
trees = {{"params": host_params(restored.params), "ema": host_params(restored.ema_params),
          "opt": host_params(restored.opt_state), "step": np.asarray(restored.step)}}
np.savez(sys.argv[2], **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(trees)}})
print("RESTORED", jax.process_count(), jax.device_count(), int(restored.step))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, compile_cache):
    single = run_child(tmp_path / "single", compile_cache, COMMON, devices=8)

    workdir, port = tmp_path / "multi", free_port()
    children = []
    for process_id in range(2):
        overrides = COMMON | {"distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
                              "distributed.num_processes": 2, "distributed.process_id": process_id}
        out = tmp_path / "multi.npz"
        cmd = [sys.executable, "-c", CHILD, "", json.dumps(overrides), str(workdir), str(out)]
        children.append(subprocess.Popen(cmd, cwd=REPO, env=train_env(compile_cache, devices=4),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [c.communicate(timeout=900)[0] for c in children]
    for c, text in zip(children, outputs):
        assert c.returncode == 0 and "CHILD DONE" in text, text[-5000:]
    assert "2 process(es)" in outputs[0]
    multi = dict(np.load(tmp_path / "multi.npz"))
    got = losses(workdir)
    for step in (1, 2, 3):
        np.testing.assert_allclose(got[step], single["losses"][step], rtol=1e-5)
    for name, value in single["arrays"].items():
        np.testing.assert_allclose(multi[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    shards = sorted(p.name for p in (workdir / "checkpoints" / "3" / "data").glob("process_*"))
    assert shards == ["process_0-of-2.json", "process_1-of-2.json"]

    result = subprocess.run([sys.executable, "-c", RESTORE, str(workdir), str(tmp_path / "restored.npz")], cwd=REPO,
                            env=train_env(compile_cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "RESTORED 1 1 3" in result.stdout, result.stdout[-2000:] + result.stderr[-5000:]
    restored = dict(np.load(tmp_path / "restored.npz"))
    assert set(restored) == set(multi)
    for name, value in multi.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
