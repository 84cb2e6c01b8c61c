"""Memory planner: compile a config's train step ahead of time for a mesh, with no weights and no data.

    python -m sdxl_jax.plan --config configs/sdxl_finetune_1024.py --mesh data=1,fsdp=8,tensor=1 \
        --batch_per_device 1 [--remat full] [--height 1024 --width 1024] [--config.x=y ...]

The step is lowered with abstract inputs (`ShapeDtypeStruct`s carrying the run's shardings) on fake
CPU devices (`--xla_force_host_platform_device_count`), compiled, and XLA's own accounting of the
executable is printed per device: arguments (state, frozen params, batch), outputs, temporaries, the
argument bytes donated to outputs, and the total live at the peak; plus the model FLOPs per step
(`step.model_flops`: matmuls and convolutions of the step traced without remat). The figures
are the CPU compiler's: a TPU/GPU compile fuses and schedules differently (and keeps bf16 where the
CPU may upcast), so treat them as a plan, not a promise.
"""

import os

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from jax._src import xla_bridge
from ml_collections import config_flags

from sdxl_jax.sharding import batch_shards, make_mesh, tracing_context
from sdxl_jax.train.state import abstract_params, new_state, split_params, trainable_components
from sdxl_jax.train.step import StepSpec, make_train_step, model_flops

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a training config (configs/*.py[:arg])", lock_config=False)
flags.DEFINE_string("mesh", "data=1,fsdp=8,tensor=1", "mesh axis sizes, e.g. data=2,fsdp=4,tensor=1")
flags.DEFINE_integer("batch_per_device", 1, "examples per device of the batch axis")
flags.DEFINE_string("remat", None, "override the UNet remat policy: none | minimal | full")
flags.DEFINE_integer("height", 1024, "image height (pixels) of the planned bucket")
flags.DEFINE_integer("width", 1024, "image width (pixels) of the planned bucket")
flags.DEFINE_bool("cached_latents", False, "plan for batches of cached latents and text (no VAE/text encoders)")
flags.mark_flags_as_required(["config"])
GiB = 2**30


def parse_mesh(text: str) -> dict[str, int]:
    sizes = dict(item.split("=") for item in text.split(","))
    if set(sizes) != {"data", "fsdp", "tensor"}:
        raise ValueError(f"--mesh needs data=,fsdp=,tensor=, got {text!r}")
    return {k: int(v) for k, v in sizes.items()}


def abstract_batch(models, batch: int, height: int, width: int, cached: bool, sharding) -> dict:
    """`ShapeDtypeStruct`s of one global batch (the data contract), sharded like the run's batches."""
    f = models.vae.downsample_factor
    s = lambda shape, dtype: jax.ShapeDtypeStruct((batch, *shape), np.dtype(dtype), sharding=sharding)
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


def abstract_step(config, mesh_sizes: dict[str, int], batch_per_device: int, height: int, width: int, cached: bool):
    """What compiling the step needs, all abstract: (`StepSpec`, (state, frozen, batch)) as
    `ShapeDtypeStruct`s carrying the run's shardings."""
    config.mesh.update(mesh_sizes)
    mesh = make_mesh(config.mesh)
    spec = StepSpec.build(config, mesh)
    unboxed = nn.meta.unbox(abstract_params(spec.models))
    train, frozen = split_params(unboxed, trainable_components(config, spec.models))
    with_sharding = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh
    )
    state = with_sharding(jax.eval_shape(lambda p: new_state(p, spec.tx, config.seed), train), spec.state_shardings)
    frozen = with_sharding(frozen, spec.frozen_shardings)
    global_batch = batch_per_device * batch_shards(mesh, config.sharding_rules)
    batch = abstract_batch(spec.models, global_batch, height, width, cached, spec.batch_sharding)
    return spec, (state, frozen, batch)


def plan(config, mesh_sizes: dict[str, int], batch_per_device: int, height: int, width: int, cached: bool) -> dict:
    """Compile the step for the mesh (devices must exist) and return XLA's memory figures and the model FLOPs."""
    spec, inputs = abstract_step(config, mesh_sizes, batch_per_device, height, width, cached)
    with tracing_context(config, spec.mesh):
        compiled = make_train_step(spec).lower(*inputs).compile()
        flops = model_flops(spec, *inputs)
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    mesh = spec.mesh
    return {"devices": mesh.size, "mesh": dict(mesh.shape), "remat": spec.models.unet.remat,
            "global_batch": inputs[2]["ids_g"].shape[0], "constraints": config.activation_constraints,
            "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes, "total": peak,
            "flops_per_device": flops / mesh.size, "flops_per_step": flops}  # fmt: skip


def report(r: dict) -> str:
    lines = [
        f"mesh {r['mesh']} ({r['devices']} devices), remat {r['remat']}, global batch {r['global_batch']}, "
        f"activation constraints {'on' if r['constraints'] else 'off'}",
        "per device:",
    ]
    for key in ("arguments", "outputs", "aliased", "temporaries", "total"):
        lines.append(f"  {key:<12} {r[key] / GiB:8.2f} GiB  ({r[key] / 2**20:.1f} MiB)")
    lines.append(
        f"FLOPs per step: {r['flops_per_step'] / 1e12:.1f} TFLOP ({r['flops_per_device'] / 1e12:.2f} per device, "
        f"{r['flops_per_step'] / r['global_batch'] / 1e12:.1f} per example)"
    )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sizes = parse_mesh(FLAGS.mesh)
    n = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("the JAX backend started before the planner could set the fake device count")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    jax.config.update("jax_platforms", "cpu")
    config = FLAGS.config
    if FLAGS.remat is not None:
        config.model.unet.remat = FLAGS.remat
    print(report(plan(config, sizes, FLAGS.batch_per_device, FLAGS.height, FLAGS.width, FLAGS.cached_latents)))


if __name__ == "__main__":
    app.run(main)
