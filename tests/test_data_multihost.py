"""Two real JAX processes (jax.distributed on localhost) load their own halves of the same global batches."""

import os
import subprocess
import sys
import textwrap

import numpy as np

from sdxl_jax.data import default_data_config, make_loader
from tests.helpers.data_fixtures import SMALL_BUCKETS, mixed_folder
from tests.helpers.processes import free_port

HOST = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    port, pid, folder, out, buckets = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert (jax.process_index(), jax.process_count()) == (pid, 2)
    from sdxl_jax.data import default_data_config, make_loader
    c = default_data_config()
    c.update(dict(path=folder, buckets=buckets, num_workers=0, record_ids=True, flip_prob=0.5))
    c.update(dict(num_epochs=2, remainder="carry"))
    batches = list(make_loader(c, seed=11, global_batch_size=4))  # process index/count from jax
    np.savez(out, **{f"{k}/{i}": v for i, b in enumerate(batches) for k, v in b.items()}, n=len(batches))
    jax.distributed.shutdown()
""")


def test_two_processes_agree_on_buckets_and_split_each_global_batch(tmp_path):
    folder = mixed_folder(tmp_path / "mixed", n=16)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOST, str(port), str(p), str(folder), str(tmp_path / f"host{p}.npz"), SMALL_BUCKETS],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for p in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    hosts = [np.load(tmp_path / f"host{p}.npz") for p in range(2)]
    c = default_data_config()
    c.update(
        dict(
            path=str(folder),
            buckets=SMALL_BUCKETS,
            num_workers=0,
            record_ids=True,
            flip_prob=0.5,
            num_epochs=2,
            remainder="carry",
        )
    )
    whole = list(make_loader(c, seed=11, global_batch_size=4, process_index=0, process_count=1))
    assert int(hosts[0]["n"]) == int(hosts[1]["n"]) == len(whole) == 8
    for i, batch in enumerate(whole):
        assert hosts[0][f"images/{i}"].shape == hosts[1][f"images/{i}"].shape == (2, *batch["images"].shape[1:])
        for k, v in batch.items():
            np.testing.assert_array_equal(np.concatenate([hosts[0][f"{k}/{i}"], hosts[1][f"{k}/{i}"]]), v, err_msg=k)
