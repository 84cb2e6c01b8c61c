"""A run's result as a checkpoint others can open: the trained UNet (EMA by default) with the frozen parts,
or the trained VAE.

    export_run(spec, state, frozen, workdir)   # -> WORKDIR/export/{sdxl_jax,diffusers,sdxl.safetensors,...}

`config.export_on_finish` (one format, or several comma-separated): "none"; "project" (this project's
format: what `sample.py` and `Pipeline.load` read fastest, and the only one for a pixel-space model such
as the demo's); "diffusers" (a `StableDiffusionXLPipeline` / `Img2Img` folder); "single_file" (the
original sgm layout the web UIs open); "lora" (a LoRA run's adapters alone, as the file kohya / diffusers
/ ComfyUI load: `lora.safetensors` in kohya's format or `pytorch_lora_weights.safetensors` in diffusers',
per `config.lora.format`). A LoRA run's other exports hold the base with the adapters merged in.
The autoencoder objective exports its VAE (the decoder-only run's with the encoder it kept):
"diffusers" as an `AutoencoderKL` folder (`export/vae/`), "single_file" as an ldm-layout file
(`export/vae.safetensors`); both are what `Pipeline.load(vae=...)` / `sample.py --vae` read, the folder
also `AutoencoderKL.from_pretrained`.
An existing export is never overwritten: a later one, at another step, goes to `NAME-stepN`. Every
process takes part in gathering the sharded params; process 0 writes.
"""

import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from sdxl_jax import storage
from sdxl_jax.convert.export import export_diffusers, export_single_file, export_vae_diffusers, export_vae_file
from sdxl_jax.convert.lora import save_lora
from sdxl_jax.convert.pipeline_weights import PipelineWeights, save_project
from sdxl_jax.train import lora
from sdxl_jax.train.config import export_formats
from sdxl_jax.train.state import model_params

EXPORT_PATHS = {"project": "export/sdxl_jax", "diffusers": "export/diffusers", "single_file": "export/sdxl.safetensors"}
LORA_PATHS = {"kohya": "export/lora.safetensors", "diffusers": "export/pytorch_lora_weights.safetensors"}
EXPORTERS = {"project": save_project, "diffusers": export_diffusers, "single_file": export_single_file}
VAE_PATHS = {"diffusers": "export/vae", "single_file": "export/vae.safetensors"}
VAE_EXPORTERS = {"diffusers": export_vae_diffusers, "single_file": export_vae_file}


def host_params(tree) -> dict:
    """Global (possibly multi-host, sharded) arrays -> numpy, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def pipeline_weights(spec, state, frozen: dict, use_ema: bool) -> PipelineWeights:
    """The run's networks as `PipelineWeights` (a LoRA run's with its adapters merged); the metadata
    records the training objective (`config.diffusion`), so `Pipeline.load` samples with the matching
    prediction and schedule."""
    trained = state.ema_params if use_ema else state.params
    params = host_params(model_params(frozen, trained, spec.lora))
    models, diffusion = spec.models, spec.config.diffusion
    components = {name: (models.config(name), params[name]) for name in models.components}
    source = "ema" if use_ema else "params"
    metadata = {
        "source": f"sdxl_jax train.py ({source}, step {int(state.step)})",
        "prediction": diffusion.prediction,
        "zero_terminal_snr": str(bool(diffusion.zero_terminal_snr)).lower(),
    }
    return PipelineWeights(models.kind, components, metadata)


def lora_metadata(config, state) -> dict[str, str]:
    """kohya's training entries (`ss_*`) and `modelspec.*` of this run, for the LoRA file's header."""
    o, lo, d = config.optimizer, config.lora, config.diffusion
    text_lr = o.text_encoder_learning_rate if lora.text_encoders(lo) else 0.0
    return {
        "ss_sd_model_name": str(config.init_from).rstrip("/").rsplit("/", 1)[-1] or "random init",
        "ss_learning_rate": str(o.learning_rate), "ss_unet_lr": str(o.learning_rate),
        "ss_text_encoder_lr": str(text_lr), "ss_lr_scheduler": o.schedule, "ss_lr_warmup_steps": str(o.warmup_steps),
        "ss_optimizer": f"optax.adamw(b1={o.b1}, b2={o.b2}, eps={o.eps}, weight_decay={o.weight_decay})",
        "ss_max_train_steps": str(config.num_steps), "ss_steps": str(int(state.step)), "ss_seed": str(config.seed),
        "ss_total_batch_size": str(config.batch_size * o.accumulation_steps),
        "ss_gradient_accumulation_steps": str(o.accumulation_steps), "ss_max_grad_norm": str(o.grad_clip_norm),
        "ss_network_dropout": "None", "ss_rank_dropout": str(lo.dropout) if lo.dropout else "None",
        "ss_noise_offset": str(d.offset_noise), "ss_zero_terminal_snr": str(bool(d.zero_terminal_snr)),
        "ss_v_parameterization": str(d.prediction == "v_prediction"), "ss_min_snr_gamma": (
            str(d.min_snr_gamma) if d.weighting.startswith("min_snr") else "None"),
        "ss_training_comment": f"sdxl_jax train.py, {'EMA' if config.export_ema else 'last'} adapters",
        "modelspec.title": "sdxl_jax LoRA", "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{config.validation.height}x{config.validation.width}",
    }  # fmt: skip


def trained_vae(spec, state, frozen: dict, use_ema: bool):
    """(config, numpy params) of an autoencoder run's VAE, whole (a decoder-only run's with its frozen
    encoder side)."""
    trained = state.ema_params if use_ema else state.params
    return spec.models.vae, host_params(model_params(frozen, {"vae": trained["vae"]}, None)["vae"])


def export_run(spec, state, frozen: dict, workdir) -> list:
    """Write the exports named by `config.export_on_finish` (into a bucket too: staged locally, uploaded
    with its index last); returns their paths (none for "none")."""
    return [export_one(spec, state, frozen, workdir, fmt) for fmt in export_formats(spec.config)]


def export_one(spec, state, frozen: dict, workdir, fmt: str):
    """Write one export format; returns its path."""
    config = spec.config
    autoencoder = config.objective == "autoencoder"
    paths = VAE_PATHS if autoencoder else {**EXPORT_PATHS, "lora": LORA_PATHS[config.lora.format]}
    out = storage.path(workdir) / paths[fmt]
    if out.exists():  # a finished run started again, or extended: keep the earlier export
        out = out.with_name(f"{out.stem}-step{int(state.step)}{out.suffix}")
        if out.exists():
            print(f"export {out} exists (this step's); not written again")
            return out
    if autoencoder:
        cfg, params = trained_vae(spec, state, frozen, config.export_ema)
        source = "ema" if config.export_ema else "params"
        metadata = {"source": f"sdxl_jax train.py autoencoder ({source}, step {int(state.step)})"}
        if jax.process_index() == 0:
            VAE_EXPORTERS[fmt](cfg, params, out, metadata)
        return out
    if fmt == "lora":
        adapters = host_params(state.ema_params if config.export_ema else state.params)
        models = spec.models
        configs_only = lora.configs_only(models)
        if jax.process_index() == 0:
            flat = lora.flat_adapters(lora.unstacked(adapters))
            save_lora(flat, spec.lora, configs_only, out, config.lora.format, lora_metadata(config, state))
        return out
    weights = pipeline_weights(spec, state, frozen, config.export_ema)
    if jax.process_index() == 0:
        EXPORTERS[fmt](weights, out)
    return out
