"""Train-step throughput: steps/s, images/s, model FLOPs (`sdxl_jax.train.flops`) and MFU.

    python bench/train_step.py --preset tiny --devices 1            # one setting
    python bench/train_step.py --cpu_table                          # tiny and mid, 1 and 8 fake CPU devices
    python bench/train_step.py --preset sdxl --batch_per_device 8 --remat minimal --peak_tflops 989
                                                                    # full SDXL base at 1024², on an accelerator

Presets: `tiny` (configs/tiny.py, 32² images), `mid` (a 128-channel, 3-level UNet with attention at
two levels, 128² images, tiny text encoders/VAE), `sdxl` (configs/sdxl_finetune_1024.py: the full base
at 1024², bf16 compute, fp32 master weights). The batch is a fixed synthetic one; the first two steps
(compilation) are not timed. On the CPU, `--devices N` fakes N devices (set before JAX starts).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_config(preset: str, remat: str | None):
    if preset == "sdxl":
        from configs.sdxl_finetune_1024 import get_config
        from configs.tiny import get_config as tiny_config

        c = get_config(remat or "minimal")
        c.data = tiny_config().data  # a fixed synthetic batch, at SDXL's widths and 1024²
        c.data.update(buckets=((1024, 1024),), context_dim=2048, pooled_dim=1280)
        return c
    from configs.tiny import get_config

    c = get_config()
    c.data.buckets = ((32, 32),)
    if preset == "mid":
        c.model.unet.update(
            model_channels=128,
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 1, 2),
            transformer_depth_middle=2,
            num_res_blocks=2,
            head_dim=32,
            norm_groups=32,
        )
        c.data.buckets = ((128, 128),)
    if remat:
        c.model.unet.remat = remat
    return c


def bench(preset: str, batch_per_device: int, steps: int, remat: str | None, peak_tflops: float) -> dict:
    import jax
    import numpy as np

    from sdxl_jax.sharding import make_mesh, tracing_context
    from sdxl_jax.train.data import global_batch, make_data
    from sdxl_jax.train.state import create_sharded_state
    from sdxl_jax.train.step import CompiledSteps, StepSpec

    c = build_config(preset, remat)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    mesh = make_mesh(c.mesh)
    c.batch_size = batch_per_device * mesh.size
    spec = StepSpec.build(c, mesh)
    models = spec.models
    state, frozen = create_sharded_state(spec)
    step = CompiledSteps(spec, lambda: tracing_context(c, mesh))
    batch = global_batch(next(make_data(c)), spec.batch_sharding)
    for _ in range(2):
        state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    flops = step.last_flops  # the whole step, all devices
    return {"preset": preset, "devices": mesh.size, "platform": jax.devices()[0].platform, "global_batch": c.batch_size,
            "remat": models.unet.remat, "steps_per_s": 1 / seconds, "images_per_s": c.batch_size / seconds,
            "tflop_per_image": flops / c.batch_size / 1e12, "mfu": flops / seconds / (peak_tflops * 1e12 * mesh.size),
            "loss": float(np.asarray(metrics["loss"]))}  # fmt: skip


def cpu_table(steps: int) -> None:
    rows = []
    for preset, per_device in (("tiny", 8), ("mid", 2)):
        for devices in (1, 8):
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            cmd = [
                sys.executable,
                __file__,
                "--preset",
                preset,
                "--devices",
                str(devices),
                "--json",
                "--batch_per_device",
                str(per_device * (8 if devices == 1 else 1)),
                "--steps",
                str(steps),
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| preset | devices | global batch | steps/s | images/s | GFLOP/image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['devices']} | {r['global_batch']} | {r['steps_per_s']:.2f} | "
            f"{r['images_per_s']:.1f} | {r['tflop_per_image'] * 1e3:.2f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "mid", "sdxl"), default="tiny")
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (CPU only)")
    parser.add_argument("--batch_per_device", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", choices=("none", "minimal", "full"), default=None)
    parser.add_argument("--peak_tflops", type=float, default=1.0, help="per device, for MFU (H100 bf16 dense: 989)")
    parser.add_argument("--cpu_table", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.cpu_table:
        return cpu_table(args.steps)
    if args.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    result = bench(args.preset, args.batch_per_device, args.steps, args.remat, args.peak_tflops)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
