"""The full SDXL base UNet matches diffusers at a 32x32 latent (slow: ~10 GB of fp32 weights per copy).

Both sides hold the same weights without ever writing them to disk: each weight is drawn from a
generator seeded by its diffusers key, so the PyTorch side (a subprocess, run first and then gone)
and the JAX side (this process) rebuild it independently. The key list is the real SDXL checkpoint's
manifest, so the load also proves the naming against the released file.
"""

import gzip
import json
import subprocess
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
BATCH, LATENT, CONTEXT_LEN = 2, 32, 77


def seeded_weight(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic, well-scaled random tensor for one diffusers key."""
    w = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape, dtype=np.float32)
    if len(shape) > 1:
        return w / np.sqrt(np.prod(shape[1:]), dtype=np.float32)  # fan-in scaling keeps activations O(1)
    if key.endswith(".weight"):  # norm scales near 1, biases near 0, neither trivial
        return 1 + 0.1 * w
    return 0.1 * w


class SeededStateDict(Mapping):
    """A state dict whose tensors are generated on access, so no second full copy is ever held."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = dict(shapes)

    def __getitem__(self, key: str) -> np.ndarray:
        return seeded_weight(key, tuple(self.shapes[key]))

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def base_config() -> dict:
    return json.loads((FIXTURES / "sdxl_diffusers_configs.json").read_text())["sdxl-base-1.0"]["unet"]


def base_manifest() -> dict[str, list[int]]:
    with gzip.open(FIXTURES / "sdxl_base_diffusers_keys.json.gz", "rt") as f:
        return json.load(f)["components"]["unet"]["tensors"]


def inputs() -> dict[str, np.ndarray]:
    """x NHWC [B, 32, 32, 4], t [B], context [B, 77, 2048], pooled text [B, 1280], time ids [B, 6]."""
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((BATCH, LATENT, LATENT, 4), dtype=np.float32),
        t=np.array([999.0, 17.0], np.float32),
        context=rng.standard_normal((BATCH, CONTEXT_LEN, 2048), dtype=np.float32),
        text_embeds=rng.standard_normal((BATCH, 1280), dtype=np.float32),
        time_ids=np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 1024, 1024]], np.float32),
    )


def torch_reference(out_file: str) -> None:
    """Subprocess entry point: diffusers' forward on the seeded weights, saved as NHWC."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(base_config())
    state = {k: torch.from_numpy(seeded_weight(k, tuple(v.shape))) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    x = inputs()
    with torch.no_grad():
        out = model(
            torch.from_numpy(x["x"].transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(x["t"]),
            torch.from_numpy(x["context"]),
            added_cond_kwargs=dict(
                text_embeds=torch.from_numpy(x["text_embeds"]), time_ids=torch.from_numpy(x["time_ids"])
            ),
        ).sample
    np.save(out_file, out.numpy().transpose(0, 2, 3, 1))


@pytest.mark.slow
def test_full_sdxl_base_matches_diffusers(tmp_path):
    from sdxl_jax.conditioning import vector_conditioning
    from sdxl_jax.convert import unet_config_from_diffusers, unet_params_from_diffusers
    from sdxl_jax.models import UNet

    ref_file = tmp_path / "reference.npy"
    subprocess.run([sys.executable, __file__, str(ref_file)], check=True)
    expected = np.load(ref_file)

    cfg = unet_config_from_diffusers(base_config())
    params = unet_params_from_diffusers(SeededStateDict(base_manifest()), cfg)
    # Move leaf by leaf, dropping each host copy, so peak memory stays near one copy of the weights.
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree_util.tree_structure(params)
    del params
    leaves = []
    for i in range(len(flat)):
        leaves.append(jax.device_put(flat[i][1]))
        flat[i] = None
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    del leaves

    x = inputs()
    y = vector_conditioning(x["text_embeds"], x["time_ids"])  # [B, 2816]
    out = np.asarray(jax.jit(UNet(cfg).apply)({"params": params}, x["x"], x["t"], x["context"], y))

    scale = float(np.abs(expected).max())
    err = float(np.abs(out - expected).max())
    print(f"full SDXL base parity: max abs error {err:.3g}, output scale {scale:.3g}")
    assert scale > 0.1
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * scale)


if __name__ == "__main__":
    torch_reference(sys.argv[1])
