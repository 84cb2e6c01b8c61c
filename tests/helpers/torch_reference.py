"""Helpers for parity tests against the PyTorch reference implementations (test-only)."""

import numpy as np
import torch

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
