"""A run's result as a checkpoint others can open: the trained UNet (EMA by default) with the frozen parts.

    export_run(models, state, frozen, config, workdir)   # -> WORKDIR/export/{sdxl_jax,diffusers,sdxl.safetensors}

`config.export_on_finish`: "none"; "project" (this project's format: what `sample.py` and `Pipeline.load`
read fastest, and the only one for a pixel-space model such as the demo's); "diffusers" (a
`StableDiffusionXLPipeline` / `Img2Img` folder); "single_file" (the original sgm layout the web UIs open).
An existing export is never overwritten: a later one, at another step, goes to `NAME-stepN`. Every
process takes part in gathering the sharded params; process 0 writes.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from sdxl_jax import storage
from sdxl_jax.convert.export import export_diffusers, export_single_file
from sdxl_jax.convert.pipeline_weights import PipelineWeights, save_project

EXPORT_PATHS = {"project": "export/sdxl_jax", "diffusers": "export/diffusers", "single_file": "export/sdxl.safetensors"}
EXPORTERS = {"project": save_project, "diffusers": export_diffusers, "single_file": export_single_file}


def host_params(tree) -> dict:
    """Global (possibly multi-host, sharded) arrays -> numpy, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def pipeline_weights(models, state, frozen: dict, use_ema: bool, diffusion=None) -> PipelineWeights:
    """The run's networks as `PipelineWeights`; `diffusion` (config.diffusion) records the training
    objective in the metadata, so `Pipeline.load` samples with the matching prediction and schedule."""
    trained = state.ema_params if use_ema else state.params
    params = host_params(frozen | trained)
    components = {name: (models.config(name), params[name]) for name in models.components}
    source = "ema" if use_ema else "params"
    metadata = {"source": f"sdxl_jax train.py ({source}, step {int(state.step)})"}
    if diffusion is not None:
        metadata |= {
            "prediction": diffusion.prediction,
            "zero_terminal_snr": str(bool(diffusion.zero_terminal_snr)).lower(),
        }
    return PipelineWeights(models.kind, components, metadata)


def export_run(models, state, frozen: dict, config, workdir):
    """Write the export named by `config.export_on_finish` (into a bucket too: staged locally, uploaded
    with its index last); returns its path (None for "none")."""
    fmt = config.export_on_finish
    if fmt == "none":
        return None
    out = storage.path(workdir) / EXPORT_PATHS[fmt]
    if out.exists():  # a finished run started again, or extended: keep the earlier export
        out = out.with_name(f"{out.stem}-step{int(state.step)}{out.suffix}")
        if out.exists():
            print(f"export {out} exists (this step's); not written again")
            return out
    weights = pipeline_weights(models, state, frozen, config.export_ema, config.diffusion)
    if jax.process_index() == 0:
        EXPORTERS[fmt](weights, out)
    return out
