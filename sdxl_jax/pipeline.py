"""Text-to-image with SDXL: `Pipeline.load(path).generate(prompts)` -> uint8 images `[B, H, W, 3]`.

The host side of generation: it loads and places the models, turns a call's `SamplingOptions` into
the schedule, tokens and micro-conditioning (`sampling.py`), places the batch on the mesh and calls the
one compiled program of `generation.py` (text encoding, every sampler step in a `lax.scan`, the
refiner, VAE decode). That program is compiled once per (batch, size, steps, sampler, schedule split,
CFG on/off, refiner mode); prompts, seeds, guidance and micro-conditioning are traced inputs.

    pipe = Pipeline.load("sd_xl_base_1.0.safetensors", refiner="sd_xl_refiner_1.0.safetensors")
    images = pipe.generate(["a photo of a cat"], steps=30, guidance_scale=5.0, seed=0,
                           denoising_end=0.8)          # base 80% of the schedule, refiner the rest
    options = SamplingOptions(steps=30, denoising_end=0.8)   # the same, as one value
    images = pipe.generate(["a photo of a cat"], options=options, seed=0)

Seeds: image i of a call with `seed=s` uses seed s + i (or `seed` may list one seed per image), and
its noise depends on that seed alone — the same seed gives the same image at any batch size or device
count. The batch is split over the mesh's `data` axis (padded to a multiple of it); parameters are
replicated, or sharded FSDP-style with `param_sharding="fsdp"` on a mesh with an `fsdp` axis.
"""

import ctypes
import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import generation, sampling
from sdxl_jax.compilation import (  # noqa: F401  (enable_compilation_cache, default_cache_dir: this module's too)
    compiled_generation,
    default_cache_dir,
    enable_compilation_cache,
    platform_of,
)
from sdxl_jax.conditioning import TextEncoders
from sdxl_jax.convert.lora import merge_loras
from sdxl_jax.convert.pipeline_weights import (
    ABSTRACT_PARAMS,
    DTYPES,
    PipelineWeights,
    Placement,
    load_pipeline_weights,
    swap_vae,
)
from sdxl_jax.diffusion import schedules
from sdxl_jax.generation import SCHEDULES, make_schedule  # noqa: F401  (part of this module's interface)
from sdxl_jax.models.pixel_space import first_stage
from sdxl_jax.models.vae import to_latents
from sdxl_jax.sampling import SamplingOptions
from sdxl_jax.sharding import PLACEMENTS, data_mesh, placement_shardings

PARAM_SHARDINGS, default_mesh = PLACEMENTS, data_mesh  # this module's names for them before sharding.py

log = logging.getLogger("sdxl_jax")


class NonFiniteImageWarning(UserWarning):
    """A decoded image held NaN or inf (written as black there)."""


def objective_from_metadata(metadata: dict[str, str]) -> dict:
    """`prediction` / `zero_terminal_snr` recorded in a checkpoint's metadata, as `from_weights` keywords."""
    out = {}
    if "prediction" in metadata:
        out["prediction"] = metadata["prediction"]
    if "zero_terminal_snr" in metadata:
        out["zero_terminal_snr"] = metadata["zero_terminal_snr"] == "true"
    return out


def shardings_on(mesh, how: str):
    """(component name, config) -> the shardings of its params on `mesh`, placed `how` (`PLACEMENTS`)."""
    return lambda name, cfg: placement_shardings(ABSTRACT_PARAMS[name](cfg), mesh, how)


class _Placer:
    """Casts one component's host params and puts them on the mesh; with `release`, drops the host copy
    from the PipelineWeights right after, so a full-size model never exists twice in host memory."""

    def __init__(self, mesh, how: str, release: bool):
        self.shardings, self.release = shardings_on(mesh, how), release

    def __call__(self, weights: PipelineWeights, name: str, cfg):
        dtype = jnp.dtype(cfg.param_dtype)
        cast = lambda x: x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype, copy=False)
        params = jax.tree.map(cast, weights.params(name))
        placed = jax.device_put(params, self.shardings(name, cfg))  # no-op for what the loader placed
        jax.block_until_ready(placed)
        if self.release:
            weights.components[name] = (weights.config(name), None)
        return placed


def _stage(
    weights: PipelineWeights, dtype: str, prediction: str, place: _Placer, attention: str | None
) -> generation.Stage:
    """A Stage with UNet and text encoders' params and compute in `dtype`, placed on the mesh; the UNet's
    attention `attention` (None: its config's)."""
    cfgs = {
        name: weights.config(name).replace(dtype=dtype, param_dtype=dtype)
        for name in ("unet", "text_encoder", "text_encoder_2")
        if name in weights.components
    }
    if attention is not None:
        cfgs["unet"] = cfgs["unet"].replace(attention=attention)
    params = {name: place(weights, name, cfg) for name, cfg in cfgs.items()}
    encoders = TextEncoders(
        cfgs["text_encoder_2"], params["text_encoder_2"], cfgs.get("text_encoder"), params.get("text_encoder")
    )
    return generation.Stage(cfgs["unet"], params["unet"], encoders, prediction)


@dataclasses.dataclass
class Pipeline:
    """Compiled SDXL generation on a device mesh. Build with `Pipeline.load` or from `PipelineWeights`."""

    models: generation.Models
    mesh: jax.sharding.Mesh
    table: schedules.DDPMTable
    source: str = ""

    @classmethod
    def from_weights(
        cls,
        base: PipelineWeights,
        refiner: PipelineWeights | None = None,
        *,
        dtype: str = "bf16",
        prediction: str = "epsilon",
        zero_terminal_snr: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        param_sharding: str = "replicated",
        release_host_copies: bool = False,
        attention: str | None = None,
        source: str = "",
    ) -> "Pipeline":
        """dtype ("bf16" | "fp32" | "fp16"): UNet and text encoders' params and compute; the VAE stays in
        its own config's dtype (fp32: the SDXL VAE overflows in half precision).
        release_host_copies: empty the given PipelineWeights' params as they move to the devices.
        attention: the UNets' and VAE's attention kernel (a key of `models.attention.ATTENTION_IMPLS`);
        default "chunked" on CPU (whole score matrices are most of the program's memory there), the
        configs' own elsewhere."""
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        if base.model != "base":
            raise ValueError(f"the first model must be an SDXL base, got a {base.model}")
        if refiner is not None and refiner.model != "refiner":
            raise ValueError(f"the refiner weights hold an SDXL {refiner.model}")
        if param_sharding not in PLACEMENTS:
            raise ValueError(f"unknown param_sharding {param_sharding!r}; valid: {', '.join(PLACEMENTS)}")
        mesh = mesh if mesh is not None else data_mesh()
        if "data" not in mesh.axis_names:
            raise ValueError(f"the mesh needs a 'data' axis for the batch, has {mesh.axis_names}")
        if attention is None and platform_of(mesh) == "cpu":
            attention = "chunked"
        place = _Placer(mesh, param_sharding, release_host_copies)
        stage = _stage(base, DTYPES[dtype], prediction, place, attention)
        ref = None if refiner is None else _stage(refiner, DTYPES[dtype], prediction, place, attention)
        vae_cfg = base.config("vae")
        if attention is not None and hasattr(vae_cfg, "attention"):  # pixel space has no VAE
            vae_cfg = vae_cfg.replace(attention=attention)
        models = generation.Models(stage, vae_cfg, place(base, "vae", vae_cfg), ref)
        return cls(models, mesh, schedules.scaled_linear_table(zero_terminal_snr=zero_terminal_snr), source)

    @classmethod
    def load(
        cls,
        path: str | Path,
        refiner: str | Path | None = None,
        dtype: str = "bf16",
        loras: Sequence[tuple[str, float]] = (),
        lora_strict: bool = True,
        vae: str | Path | None = None,
        **kwargs,
    ) -> "Pipeline":
        """Load from anything `convert.load_pipeline_weights` accepts (this project's checkpoint, a diffusers
        folder, an original single file), and optionally a refiner the same way. `prediction` and
        `zero_terminal_snr` default to what the checkpoint's metadata records (train.py's exports do),
        else SDXL's (epsilon, no). loras: `(path, scale)` LoRA files (kohya, diffusers, ComfyUI) merged
        into the base's UNet and text encoders once, here (`convert.lora`); lora_strict=False skips
        modules this model lacks with a warning. vae: another VAE instead of the checkpoint's (a diffusers
        AutoencoderKL or pipeline folder, or an original-layout file such as `sdxl_vae.safetensors`;
        `convert.pipeline_weights.load_vae_for`), with the same latent channels, downsampling and scaling."""
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        start = time.perf_counter()
        mesh = kwargs.pop("mesh", None)
        mesh = mesh if mesh is not None else data_mesh()
        shardings = shardings_on(mesh, kwargs.get("param_sharding", "replicated"))
        placement = Placement(shardings, dict.fromkeys(("unet", "text_encoder", "text_encoder_2"), DTYPES[dtype]))
        base = merge_loras(load_pipeline_weights(path, model="base", placement=placement), loras, lora_strict)
        if vae is not None:
            base = swap_vae(base, vae, placement)
        ref = load_pipeline_weights(refiner, model="refiner", placement=placement) if refiner is not None else None
        kwargs = objective_from_metadata(base.metadata) | kwargs
        pipe = cls.from_weights(
            base, ref, dtype=dtype, mesh=mesh, source=Path(path).name, release_host_copies=True, **kwargs
        )
        release_freed_memory()
        log.info(
            "loaded %s%s%s in %.1f s (%s)",
            path,
            f" + refiner {refiner}" if refiner else "",
            f" + VAE {vae}" if vae is not None else "",
            time.perf_counter() - start,
            dtype,
        )
        return pipe

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x the UNets' downsampling)."""
        stages = [self.models.base] + ([self.models.refiner] if self.models.refiner is not None else [])
        return self.models.vae_cfg.downsample_factor * max(s.unet_cfg.downsample_factor for s in stages)

    def generate(
        self,
        prompts,
        negative_prompts=None,
        *,
        options: SamplingOptions | None = None,
        seed=0,
        latents=None,
        image=None,
        refiner_noise=None,
        return_latents: bool = False,
        **option_fields,
    ):
        """Prompts -> uint8 images `[B, height, width, 3]` (and the final scaled latents `[B, h, w, 4]` with
        `return_latents`).

        options: how to sample (`SamplingOptions`; default `SamplingOptions()`); option_fields: any of its
        fields (height=, steps=, sampler=, guidance_scale=, denoising_end=, ...), replacing the options'.
        seed: an int (image i gets seed + i) or one seed per image.
        latents: `[B, h, w, 4]` unit-variance noise used instead of the seeds' initial noise (NHWC).
        image: image-to-image (at the options' `strength`) from uint8 images `[B, H, W, 3]` or scaled
        latents `[B, h, w, 4]`.
        refiner_noise: `[B, h, w, 4]`, replaces the noise the refiner's img2img adds (else drawn from the seeds).
        """
        options = (options if options is not None else SamplingOptions()).replace(**option_fields)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        batch = len(prompts)
        self._check_size(options.height, options.width)
        if options.refiner_mode is not None and self.models.refiner is None:
            raise ValueError("denoising_end / refiner_strength need a refiner (Pipeline.load(..., refiner=PATH))")
        f = self.models.vae_cfg.downsample_factor
        latent_shape = (options.height // f, options.width // f, self.models.vae_cfg.latent_channels)
        noise = None if latents is None else _check_latents(latents, batch, latent_shape, "latents")
        if refiner_noise is not None:
            refiner_noise = _check_latents(refiner_noise, batch, latent_shape, "refiner_noise")
        init_latents = None if image is None else self._init_latents(image, batch, latent_shape)
        plan, inputs = sampling.plan_and_inputs(
            options,
            self.table,
            prompts,
            negative_prompts,
            _seeds(seed, batch),
            noise=noise,
            init_latents=init_latents,
            refiner_noise=refiner_noise,
        )
        out = self._run(plan, inputs, latent_shape, batch)
        images = np.asarray(out.images)
        bad = np.flatnonzero(~np.asarray(out.finite))
        if bad.size:
            warnings.warn(
                f"image(s) {bad.tolist()} decoded to NaN/inf (written black there): the VAE overflowed; "
                f"decode in fp32 (the VAE config's dtype) or use the fp16-fix VAE",
                NonFiniteImageWarning,
                stacklevel=2,
            )
        return (images, np.asarray(out.latents)) if return_latents else images

    # ---- host-side helpers ------------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        for name, side in (("height", height), ("width", width)):
            if side < m or side % m:
                lo, hi = max(m, side // m * m), (side // m + 1) * m
                raise ValueError(
                    f"{name} {side} is not a positive multiple of {m} (VAE factor x UNet "
                    f"downsampling); try {lo} or {hi}"
                )

    def _init_latents(self, image, batch: int, latent_shape) -> np.ndarray:
        """Scaled clean latents `[B, h, w, C]` from uint8 images or from latents given as they are."""
        image = np.asarray(image)
        if image.ndim == 4 and image.shape[-1] == latent_shape[-1] and image.dtype != np.uint8:
            return _check_latents(image, batch, latent_shape, "image latents")
        f = self.models.vae_cfg.downsample_factor
        want = (batch, latent_shape[0] * f, latent_shape[1] * f, 3)
        if image.shape != want or image.dtype != np.uint8:
            raise ValueError(
                f"image must be uint8 {want} (or scaled latents {(batch, *latent_shape)}), "
                f"got {image.dtype} {image.shape}"
            )
        return encode_images(self.models.vae_cfg, self.models.vae_params, jnp.asarray(image))

    def _run(self, plan: generation.Plan, inputs: generation.Inputs, latent_shape, batch: int) -> generation.Outputs:
        data = self.mesh.shape["data"]
        padded = -(-batch // data) * data
        inputs = jax.device_put(_pad_batch(inputs, batch, padded), generation.input_shardings(inputs, self.mesh))
        platform = platform_of(self.mesh)
        if platform == "cpu":  # the decoder's activations, one image per device at a time
            plan = dataclasses.replace(plan, decode_group=data)
        options = generation.compiler_options(platform)
        start = time.perf_counter()
        out = compiled_generation(self.mesh, self.models, plan, inputs, latent_shape, options)(self.models, inputs)
        out = jax.tree.map(lambda x: x[:batch], jax.device_get(out))
        log.info("generated %d image(s) in %.2f s", batch, time.perf_counter() - start)
        return out


# ---- module-level pieces (jitted functions, shardings) ---------------------------------------------


def release_freed_memory() -> None:
    """Hand the memory freed while loading back to the OS (glibc's `malloc_trim`): the tensors read and
    dropped one by one are mostly below glibc's mmap threshold, so their pages otherwise stay in the
    process (counted in its RSS) after they are freed. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def encode_images(vae_cfg, vae_params, images: jax.Array) -> np.ndarray:
    """uint8 `[B, H, W, 3]` -> scaled latents `[B, H/f, W/f, C]`: the posterior mean (deterministic;
    diffusers' img2img samples the posterior instead)."""
    return np.asarray(_encode_jit(vae_cfg, vae_params, images))


def _encode(vae_cfg, vae_params, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    dist = first_stage(vae_cfg).apply({"params": vae_params}, x, method="encode")
    return to_latents(dist.mode(), vae_cfg)


_encode_jit = jax.jit(_encode, static_argnums=0)


def _seeds(seed, batch: int) -> np.ndarray:
    if isinstance(seed, (int, np.integer)):
        seeds = (int(seed) + np.arange(batch)) % 2**32
    else:
        seeds = np.asarray(seed)
        if seeds.shape != (batch,):
            raise ValueError(f"seed must be an int or one per prompt ({batch}), got shape {seeds.shape}")
    return seeds.astype(np.uint32)


def _check_latents(latents, batch: int, latent_shape, name: str) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    if latents.shape != (batch, *latent_shape):
        raise ValueError(f"{name} must be [B, h, w, C] = {(batch, *latent_shape)} (NHWC), got {latents.shape}")
    return latents


def _pad_batch(inputs: generation.Inputs, batch: int, padded: int):
    """Repeat the last example so the batch divides the data axis (padding rows are dropped after)."""
    if padded == batch:
        return inputs

    def pad(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != batch:
            return x
        return np.concatenate([x, np.repeat(x[-1:], padded - batch, axis=0)])

    return jax.tree.map(pad, inputs)
