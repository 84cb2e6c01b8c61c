"""The planner: compile a config's train step (or its sampling program) ahead of time for a target, with
no weights, no data and no accelerator, and print the compiler's own accounting of the executable.

    python -m sdxl_jax.plan --config configs/sdxl_finetune_1024.py --target tpu:v5e:2x4 \
        --mesh data=1,fsdp=8,tensor=1 [--batch_per_device 1] [--remat full] [--height 1024 --width 1024]
    python -m sdxl_jax.plan --config configs/sdxl_finetune_1024.py --target tpu:v6e:2x4 --program sample \
        [--steps 20 --guidance_scale 5]
    python -m sdxl_jax.plan --config configs/tiny.py --target cpu:4 --mesh data=1,fsdp=4,tensor=1
    python -m sdxl_jax.plan --config configs/sdxl_vae.py --target cpu:8     # the autoencoder objective's step

The program is lowered with abstract inputs (`ShapeDtypeStruct`s carrying the run's shardings) and
compiled for the target (`targets.py`: a TPU topology through libtpu, or fake XLA:CPU devices) at the
config's largest bucket (train) or validation size (sample) unless --height/--width are given. Per
device it prints arguments (state, frozen params, batch), outputs, temporaries, the argument bytes
donated to outputs, and the total live at the peak; on a TPU target also the fit against the chip's
HBM, the largest batch per device that fits (found by compiling), and a roofline lower bound of the
run time: the model FLOPs (`flops.jaxpr_flops` of the program traced without remat, XLA attention) and
the compiled program's HBM traffic (`hlo_traffic.memory_traffic`, loops times their trip counts)
against the chip's peaks. These are compiler plans and bounds, not timings.
"""

import dataclasses
import os
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from jax._src import xla_bridge
from jax.sharding import AxisType
from ml_collections import config_flags

from sdxl_jax import generation
from sdxl_jax.data.buckets import Bucket, config_buckets, largest_bucket
from sdxl_jax.diffusion import schedules
from sdxl_jax.sampling import SamplingOptions, plan_and_inputs
from sdxl_jax.sharding import (
    SAMPLING_RULES,
    batch_shards,
    make_mesh,
    placement_shardings,
    sharding_context,
    tracing_context,
)
from sdxl_jax.train.flops import jaxpr_flops
from sdxl_jax.train.plan_report import largest_batch, measure, report
from sdxl_jax.train.state import (
    Models,
    abstract_params,
    abstract_state,
    models_from_config,
    xla_attention,
)
from sdxl_jax.train.step import StepSpec, make_train_step, model_flops
from sdxl_jax.train.targets import Target, parse_target

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a training config (configs/*.py[:arg])", lock_config=False)
flags.DEFINE_string(
    "target", "cpu", "tpu:<generation>:<topology> (e.g. tpu:v5e:2x4), gpu:h100:<N>, or cpu[:N] (fake devices)"
)
flags.DEFINE_enum("program", "train", ["train", "sample"], "the train step, or the generation program")
flags.DEFINE_string("mesh", "data=1,fsdp=8,tensor=1", "train: mesh axis sizes, e.g. data=2,fsdp=4,tensor=1")
flags.DEFINE_integer("batch_per_device", 1, "examples (train) or images (sample) per device")
flags.DEFINE_string("remat", None, "override the UNet remat policy: none | minimal | full")
flags.DEFINE_string("attention", None, "override the UNet attention kernel (xla | flash | cudnn)")
flags.DEFINE_integer(
    "height", None, "image height (pixels); default: train, the config's largest bucket; sample, its validation size"
)
flags.DEFINE_integer("width", None, "image width (pixels); default as --height")
flags.DEFINE_bool("cached_latents", False, "train: batches of cached latents and text (no VAE/text encoders)")
flags.DEFINE_integer("steps", None, "sample: sampler steps (default: the config's validation steps)")
flags.DEFINE_float(
    "guidance_scale",
    None,
    "sample: classifier-free guidance scale (1 = no CFG, half the work; default: the config's validation scale)",
)
flags.DEFINE_bool("search_batch", True, "TPU targets: find the largest batch per device that fits, by compiling")
flags.DEFINE_integer("batch_limit", 64, "the batch search stops at this many per device")
flags.DEFINE_string("hlo_dir", None, "write each compiled program's optimized HLO text into this folder")
flags.mark_flags_as_required(["config"])


# ---- abstract inputs ----------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
    sizes = dict(item.split("=") for item in text.split(","))
    if set(sizes) != {"data", "fsdp", "tensor"}:
        raise ValueError(f"--mesh needs data=,fsdp=,tensor=, got {text!r}")
    return {k: int(v) for k, v in sizes.items()}


def abstract_batch(models, batch: int, height: int, width: int, cached: bool, sharding) -> dict:
    """`ShapeDtypeStruct`s of one global batch (the data contract), sharded like the run's batches; an
    autoencoder's batch is its images alone (what its step reads)."""
    f = models.vae.downsample_factor
    s = lambda shape, dtype: jax.ShapeDtypeStruct((batch, *shape), np.dtype(dtype), sharding=sharding)
    if models.kind == "autoencoder":
        if cached:
            raise ValueError("--cached_latents: an autoencoder trains on images")
        return {"images": s((height, width, 3), "uint8")}
    out = {"ids_l": s((77,), "int32"), "ids_g": s((77,), "int32"), "eot_l": s((), "int32"), "eot_g": s((), "int32"),
           "original_size": s((2,), "int32"), "crop_top_left": s((2,), "int32"), "target_size": s((2,), "int32"),
           "drop_text": s((), "bool"), "aesthetic_score": s((), "float32")}  # fmt: skip
    if cached:
        out |= {
            "latent_moments": s((height // f, width // f, 2 * models.vae.latent_channels), "float32"),
            "context": s((77, models.unet.context_dim), "float32"),
            "pooled": s((models.text_encoder_2.projection_dim,), "float32"),
        }
    else:
        out["images"] = s((height, width, 3), "uint8")
    return out


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_step(
    config, mesh_sizes: dict[str, int], batch_per_device: int, height: int, width: int, cached: bool, devices=None
):
    """What compiling the step needs, all abstract: (`StepSpec`, (state, frozen, batch)) as
    `ShapeDtypeStruct`s carrying the run's shardings, on a mesh of `devices` (default: this host's).
    The state is the objective's (`state.abstract_state`: an autoencoder's with its discriminator, its
    frozen params with LPIPS)."""
    config.mesh.update(mesh_sizes)
    mesh = make_mesh(config.mesh, devices)
    spec = StepSpec.build(config, mesh)
    state, frozen = nn.meta.unbox(abstract_state(config, spec.models, spec.tx, spec.objective))
    state = _with_shardings(state, spec.state_shardings)
    frozen = _with_shardings(frozen, spec.frozen_shardings)
    global_batch = batch_per_device * batch_shards(mesh, config.sharding_rules)
    batch = abstract_batch(spec.models, global_batch, height, width, cached, spec.batch_sharding)
    return spec, (state, frozen, batch)


def sampling_models(models: Models) -> Models:
    """The configs `Pipeline` samples with: UNet and text encoders in bf16 (params and compute), the VAE
    as configured (its decode in fp32 by default), UNet remat off (nothing to differentiate)."""
    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    enc = {n: models.config(n).replace(**bf16) for n in ("text_encoder", "text_encoder_2") if models.config(n)}
    return dataclasses.replace(models, unet=models.unet.replace(remat="none", **bf16), **enc)


def abstract_sampling(config, models: Models, devices, batch_per_device: int, options: SamplingOptions):
    """(program, (params, inputs)) for `generation.generate` over a `data` mesh of `devices`, parameters
    replicated (how `Pipeline` places them by default), one prompt batch split along `data`."""
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    boxed = abstract_params(models)
    shardings = {n: placement_shardings(p, mesh, "replicated") for n, p in boxed.items()}
    params = _with_shardings(nn.meta.unbox(boxed), nn.meta.unbox(shardings))
    batch = batch_per_device * len(devices)
    table = schedules.scaled_linear_table(zero_terminal_snr=config.diffusion.zero_terminal_snr)
    seeds = np.arange(batch, dtype=np.uint32)
    plan, inputs = plan_and_inputs(options, table, ["a photo"] * batch, None, seeds)
    inputs = _with_shardings(jax.tree.map(np.asarray, inputs), generation.input_shardings(inputs, mesh))
    f = models.vae.downsample_factor
    latent_shape = (options.height // f, options.width // f, models.vae.latent_channels)

    def program(params, inputs):
        stage = generation.Stage(models.unet, params["unet"], models.encoders(params), config.diffusion.prediction)
        return generation.generate(generation.Models(stage, models.vae, params["vae"]), plan, inputs, latent_shape)

    return program, (params, inputs)


# ---- compile (what a compile gives: `plan_report`) --------------------------------------------------


def compile_step(
    config, mesh_sizes, batch_per_device: int, height: int, width: int, cached: bool, devices, hlo_dir=None
):
    """The train step compiled for `devices` (a TPU topology's or this host's); its HLO text into
    `hlo_dir` when given."""
    start = time.perf_counter()
    spec, inputs = abstract_step(config, mesh_sizes, batch_per_device, height, width, cached, devices)
    with tracing_context(config, spec.mesh):
        lowered = make_train_step(spec).lower(*inputs)
        flops = model_flops(spec, *inputs)
    batch = inputs[2]["images" if spec.models.kind == "autoencoder" else "ids_g"].shape[0]
    path = hlo_dir and os.path.join(hlo_dir, f"train_batch{batch}.hlo.txt")
    return measure(lowered, flops, spec.mesh.size, batch, start, path)


def compile_sampling(config, models: Models, devices, batch_per_device: int, options: SamplingOptions, hlo_dir=None):
    """The generation program (text encoders, the sampler's scan over UNet calls, VAE decode) compiled."""
    start = time.perf_counter()
    program, args = abstract_sampling(config, models, devices, batch_per_device, options)
    mesh = args[1].seeds.sharding.mesh
    with sharding_context(mesh, SAMPLING_RULES):  # as `Pipeline` traces it
        lowered = jax.jit(program).lower(*args)
    reference, _ = abstract_sampling(config, xla_attention(models), devices, batch_per_device, options)
    flops = jaxpr_flops(jax.jit(reference).trace(*args).jaxpr)
    batch = batch_per_device * len(devices)
    path = hlo_dir and os.path.join(hlo_dir, f"sample_batch{batch}.hlo.txt")
    return measure(lowered, flops, len(devices), batch, start, path)


def _devices(target: Target, count: int):
    """The target's devices, after pointing JAX at fake CPU devices if the target needs them."""
    if target.platform == "cpu":
        if xla_bridge.backends_are_initialized():
            raise RuntimeError("the JAX backend started before the planner could set the fake device count")
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    jax.config.update("jax_platforms", "cpu")  # no TPU runtime is wanted, only its compiler
    devices = target.devices()
    return devices[:count] if target.platform == "cpu" else devices


def planned_size(config, program: str, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) in pixels: the flags where given, else the config's largest bucket (train) or its
    validation size (sample)."""
    if (height is None) != (width is None):
        raise app.UsageError("give --height and --width together (or neither, for the config's size)")
    if program == "train":
        default = largest_bucket(config_buckets(config.data.buckets))
    else:
        default = Bucket(config.validation.height, config.validation.width)
    return (height or default.h, width or default.w)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    target, config = parse_target(FLAGS.target), FLAGS.config
    autoencoder = config.model.kind == "autoencoder"
    if autoencoder and (FLAGS.remat or FLAGS.attention or FLAGS.program == "sample"):
        raise app.UsageError("an autoencoder config plans its train step only (no UNet: no --remat, --attention)")
    if FLAGS.remat is not None:
        config.model.unet.remat = FLAGS.remat
    if FLAGS.attention is not None:
        config.model.unet.attention = FLAGS.attention
    height, width = planned_size(config, FLAGS.program, FLAGS.height, FLAGS.width)
    if FLAGS.program == "train":
        sizes = parse_mesh(FLAGS.mesh)
        devices = _devices(target, target.cpu_devices or sizes["data"] * sizes["fsdp"] * sizes["tensor"])
        shape = (height, width, FLAGS.cached_latents)
        compile_at = lambda b: compile_step(config, sizes, b, *shape, devices, FLAGS.hlo_dir)
        what = f"train step {height}x{width}, mesh {sizes}, " + (
            "autoencoder" if autoencoder else f"remat {config.model.unet.remat}"
        )
        unit = "example"
    else:
        devices = _devices(target, target.cpu_devices or 1)
        v = config.validation
        options = SamplingOptions(
            height=height, width=width, steps=FLAGS.steps or v.steps,
            guidance_scale=v.guidance_scale if FLAGS.guidance_scale is None else FLAGS.guidance_scale,
        )  # fmt: skip
        models = sampling_models(models_from_config(config.model))
        compile_at = lambda b: compile_sampling(config, models, devices, b, options, FLAGS.hlo_dir)
        what = f"sampling {options.height}x{options.width}, {options.steps} steps, CFG {options.guidance_scale}"
        unit = "image"
    first = compile_at(FLAGS.batch_per_device)
    search = None
    if target.chip is not None and FLAGS.search_batch:
        hbm = target.per_device(len(devices))[0]
        search = largest_batch(compile_at, FLAGS.batch_per_device, first, hbm, FLAGS.batch_limit)
    print(report(target, what, first, len(devices), search, unit, FLAGS.batch_limit))


if __name__ == "__main__":
    app.run(main)
