"""Reading PyTorch weights from disk (no torch needed for `.safetensors`), and the per-component loaders."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.convert.unet import unet_config_from_diffusers, unet_params_from_diffusers
from sdxl_jax.models.unet import UNetConfig


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file, or of a sharded set given its `*.safetensors.index.json`."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            part = load_file(path.parent / shard)
            overlap = state.keys() & part.keys()
            if overlap:
                raise ConversionError(f"{shard}: tensors present in two shards: {sorted(overlap)[:5]}")
            state.update(part)
        if missing := set(weight_map) - state.keys():
            raise ConversionError(f"{path}: index names tensors no shard holds: {sorted(missing)[:5]}")
        return state
    return load_file(path)


def _component_weights(folder: Path, stem: str) -> Path:
    """The weights file of a diffusers component folder: single or sharded safetensors."""
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
        if (folder / name).exists():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"no {stem}.safetensors (or sharded index) in {folder}; it holds {found}")


def load_unet(path: str | Path, **config_overrides) -> tuple[UNetConfig, dict]:
    """(config, params) of a diffusers `unet/` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

    config_overrides: UNetConfig fields to set on top (dtype, param_dtype, remat, scan_layers, ...).
    """
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffusers UNet folder: no config.json")
    cfg = unet_config_from_diffusers(json.loads((folder / "config.json").read_text()), **config_overrides)
    state = read_safetensors(_component_weights(folder, "diffusion_pytorch_model"))
    return cfg, unet_params_from_diffusers(state, cfg)
