"""A run's result in the PyTorch formats: the trained UNet (EMA by default) with the frozen parts.

    export_run(models, state, frozen, config, workdir)   # -> WORKDIR/export/diffusers or sdxl.safetensors

`config.export_on_finish`: "none", "diffusers" (a `StableDiffusionXLPipeline` / `Img2Img` folder) or
"single_file" (the original sgm layout the web UIs open). Every process takes part in gathering the
sharded params; process 0 writes.
"""

from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from sdxl_jax.convert.export import export_diffusers, export_single_file
from sdxl_jax.convert.pipeline_weights import PipelineWeights

EXPORT_PATHS = {"diffusers": "export/diffusers", "single_file": "export/sdxl.safetensors"}
EXPORTERS = {"diffusers": export_diffusers, "single_file": export_single_file}


def host_params(tree) -> dict:
    """Global (possibly multi-host, sharded) arrays -> numpy, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def pipeline_weights(models, state, frozen: dict, use_ema: bool) -> PipelineWeights:
    trained = state.ema_params if use_ema else state.params
    params = host_params(frozen | trained)
    components = {name: (models.config(name), params[name]) for name in models.components}
    source = "ema" if use_ema else "params"
    return PipelineWeights(models.kind, components, {"source": f"sdxl_jax train.py ({source}, step {int(state.step)})"})


def export_run(models, state, frozen: dict, config, workdir: str | Path) -> Path | None:
    """Write the export named by `config.export_on_finish`; returns its path (None for "none")."""
    fmt = config.export_on_finish
    if fmt == "none":
        return None
    weights = pipeline_weights(models, state, frozen, config.export_ema)
    out = Path(workdir) / EXPORT_PATHS[fmt]
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        EXPORTERS[fmt](weights, out)
    return out
