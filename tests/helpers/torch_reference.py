"""Helpers for parity tests against the PyTorch reference implementations (test-only): the parity
assertion, weights and layouts across the two frameworks, and a torchvision stand-in for the oracles
that import it (`lpips`, taming's losses)."""

import contextlib
import functools
import importlib
import importlib.util
import sys
import types

import numpy as np
import torch

from sdxl_jax.models.lpips import STAGES

# SDXL base/refiner scheduler config (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json).
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    num_train_timesteps=1000, prediction_type="epsilon",
)  # fmt: skip


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Adds noise to every parameter in place, so that norms are not identity and no bias is zero.

    Without this, a swapped scale/bias or a transposed norm would go unnoticed by a parity test.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.add_(scale * noise)
            else:
                p.add_(scale * p.std().clamp_min(1e-3) * noise)
    return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def from_nchw(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def assert_parity(ours, ref, rel: float = 1e-5, name: str = ""):
    """Max abs error within `rel` of the reference output's scale (`name`: the output, for the message)."""
    ref = np.asarray(ref)
    scale = float(np.abs(ref).max())
    assert scale > 0.1, name  # a degenerate (near-zero) output would make the comparison vacuous
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=rel * scale, err_msg=name)


# torchvision stand-in. The PyPI torchvision wheels do not load against the CPU torch build (their
# compiled ops need CUDA's torch libraries), and the oracles need only `torchvision.models.vgg16`'s
# layer layout: lpips builds its VGG16 trunk from it, taming's losses module imports it.


def vgg16_features() -> torch.nn.Sequential:
    """VGG16's `features` through relu5_3, laid out from `sdxl_jax.models.lpips.STAGES`: at each conv index
    a 3x3 conv (padding 1, bias) and a ReLU at the next index, a 2x2 max pool opening every stage after
    the first. torch's default initialisation: a test draws the weights it wants."""
    layers, channels = [], 3
    for s, (_, width, indices) in enumerate(STAGES):
        if s:
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        for i in indices:
            assert len(layers) == i, f"STAGES puts a conv at index {i}, the layout at {len(layers)}"
            layers += [torch.nn.Conv2d(channels, width, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
            channels = width
    return torch.nn.Sequential(*layers)


def _stand_in_vgg16(pretrained=False, weights=None, **kwargs):
    if pretrained or weights is not None:
        raise ValueError("the torchvision stand-in has no ImageNet weights")
    return types.SimpleNamespace(features=vgg16_features())


@functools.cache
def _torchvision_loads() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.models")
        return True
    except Exception:  # noqa: BLE001  a build that cannot load against this torch: forget its half-import
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        return False


@contextlib.contextmanager
def torchvision_stand_in():
    """Import an oracle inside this: `torchvision.models.vgg16()` is then `vgg16_features()` (random, no
    pretrained weights), unless the real torchvision loads, which is then left to be imported. The
    stand-in is in `sys.modules` only while the block runs; what imported it keeps its reference."""
    if _torchvision_loads():
        yield
        return
    models = types.ModuleType("torchvision.models")
    models.vgg16 = _stand_in_vgg16
    torchvision = types.ModuleType("torchvision")
    torchvision.models = models
    sys.modules.update({"torchvision": torchvision, "torchvision.models": models})
    try:
        yield
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.models"]
