"""Multi-host on one machine: 2 processes x 4 fake CPU devices joined with `jax.distributed` (gloo
collectives over loopback) train like one process with 8 devices; their checkpoint restores in a
single process."""

import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.processes import child_env, free_port
from tests.helpers.train import ONE_BUCKET, REPO, child_command, losses, run_child

COMMON = ONE_BUCKET | {"num_steps": 3, "checkpoint_every": 3, "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1}

# The multi-process checkpoint restored in a single process (1 device): `python -c RESTORE WORKDIR OUT.npz`.
RESTORE = """
import sys
import jax, numpy as np
from sdxl_jax.sharding import make_mesh
from sdxl_jax.train import checkpoint
from sdxl_jax.train.state import create_sharded_state
from sdxl_jax.train.step import StepSpec
from tests.helpers.train import state_arrays, tiny_config
config = tiny_config("", {"mesh.fsdp": 1})
state, _ = create_sharded_state(StepSpec.build(config, make_mesh(config.mesh)))
manager = checkpoint.make_manager(sys.argv[1] + "/checkpoints", config)
restored = checkpoint.restore(manager, manager.latest_step(), state)
np.savez(sys.argv[2], **state_arrays(restored))
print("RESTORED", jax.process_count(), jax.device_count(), int(restored.step))
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single = run_child(tmp_path / "single", COMMON, devices=8)

    workdir, port = tmp_path / "multi", free_port()
    children = []
    for process_id in range(2):
        overrides = COMMON | {
            "distributed.enabled": True,
            "distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2,
            "distributed.process_id": process_id,
        }
        cmd = child_command(workdir, tmp_path / "multi.npz", overrides)
        children.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=child_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
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

    result = subprocess.run(
        [sys.executable, "-c", RESTORE, str(workdir), str(tmp_path / "restored.npz")],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "RESTORED 1 1 3" in result.stdout, result.stdout[-2000:] + result.stderr[-5000:]
    restored = dict(np.load(tmp_path / "restored.npz"))
    assert set(restored) == set(multi)
    for name, value in multi.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
