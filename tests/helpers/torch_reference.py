"""Helpers for parity tests against the PyTorch reference implementations (test-only)."""

import numpy as np
import torch


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
