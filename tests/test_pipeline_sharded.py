"""Batch generation spread over 8 devices equals the single-device result.

Runs in a subprocess so that the 8 fake CPU devices (XLA_FLAGS) exist before jax is imported. Tiny random
pipeline (no torch); meshes: 1 device, data=8 (params replicated), data=4 x fsdp=2 (params FSDP-sharded);
batches of 8 and of 5 (padded to the data axis, padding dropped).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.processes import child_env

SCRIPT = r"""
import json
import jax
import numpy as np
from jax.sharding import AxisType
from sdxl_jax.convert.random_init import random_weights, tiny_configs
from sdxl_jax.pipeline import Pipeline

assert jax.device_count() == 8
weights = random_weights("base", tiny_configs("base"), seed=3)
meshes = {
    "single": jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1]),
    "data8": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)),
    "data4_fsdp2": jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2),
}
prompts = [f"a photo of thing number {i}" for i in range(8)]
report = {"fsdp_kernel_spec": ""}
for name, mesh in meshes.items():
    if name not in MESHES:
        continue
    pipe = Pipeline.from_weights(weights, dtype="fp32", mesh=mesh,
                                 param_sharding="fsdp" if "fsdp" in mesh.axis_names else "replicated")
    if name == "data4_fsdp2":
        kernel = pipe.models.base.unet_params["conv_out"]["kernel"]
        report["fsdp_kernel_spec"] = str(kernel.sharding.spec)
    for batch in BATCHES:
        images, latents = pipe.generate(prompts[:batch], height=64, width=64, steps=3, sampler="euler_a",
                                        seed=11, return_latents=True)
        np.save(f"{OUT}/{name}_{batch}_latents.npy", latents)
        np.save(f"{OUT}/{name}_{batch}_images.npy", images)
print("REPORT" + json.dumps(report))
"""


def run_meshes(tmp_path, meshes: tuple[str, ...], batches: tuple[int, ...]) -> dict:
    script = f"OUT, MESHES, BATCHES = {str(tmp_path)!r}, {meshes!r}, {batches!r}\n" + SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", script], env=child_env(devices=8), capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("REPORT", 1)[1])


def check_equal_to_single(tmp_path, meshes, batches):
    for batch in batches:
        want = np.load(tmp_path / f"single_{batch}_latents.npy")
        want_images = np.load(tmp_path / f"single_{batch}_images.npy")
        assert want.shape[0] == batch and np.abs(want).max() > 0.1
        for mesh in meshes:
            got = np.load(tmp_path / f"{mesh}_{batch}_latents.npy")
            np.testing.assert_allclose(
                got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"{mesh} batch {batch}"
            )
            diff = np.abs(np.load(tmp_path / f"{mesh}_{batch}_images.npy").astype(int) - want_images)
            assert diff.max() <= 1, (mesh, batch)


@pytest.mark.slow  # test budget (~25 s); the sharded generation program is tested by test_pipeline
def test_data_parallel_with_padding_equals_single_device(tmp_path):
    """5 images on data=8 (3 padding rows) == on one device."""
    run_meshes(tmp_path, ("single", "data8"), (5,))
    check_equal_to_single(tmp_path, ("data8",), (5,))


@pytest.mark.slow
def test_all_meshes_and_batches_equal_single_device(tmp_path):
    report = run_meshes(tmp_path, ("single", "data8", "data4_fsdp2"), (8, 5))
    assert "fsdp" in report["fsdp_kernel_spec"]  # the FSDP mesh really shards the weights
    check_equal_to_single(tmp_path, ("data8", "data4_fsdp2"), (8, 5))
