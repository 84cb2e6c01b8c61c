"""VAE decode: the jitted Flax decoder vs diffusers' PyTorch AutoencoderKL, full SDXL VAE, random weights.

    python bench/vae_decode.py                           # fp32, batch 1, 512x512 (64x64 latent), on CPU
    python bench/vae_decode.py --latent 128 --reps 2     # 1024x1024
    python bench/vae_decode.py --tiled_memory            # also: XLA's temp memory for a tiled 2048^2 decode

Each framework runs in its own worker process, both kept alive for a round; the parent asks them for
one decode at a time, alternately, so each JAX/PyTorch pair runs back to back under about the same
load from whatever else shares the machine. The headline is the median of the per-pair ratios.
The timed region is one `decode` call (post_quant_conv + decoder), synchronised, with weights and
latent already in place, after one warm-up. Threads: PyTorch's and XLA's defaults. The FLOP count
is XLA's for the Flax graph, whose upsamplers do 2.25x fewer FLOPs than PyTorch's
(see `vae._NearestX2Conv3x3`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "fixtures" / "sdxl_diffusers_configs.json"


def jax_setup(args):
    """-> (decode(), info): one synchronised decode of the jitted Flax VAE, and compile figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdxl_jax.convert.random_init import random_params
    from sdxl_jax.models.vae import AutoencoderKL, VAEConfig
    from sdxl_jax.models.vae_tiling import tiled_decode

    cfg = VAEConfig.sdxl(dtype=args.dtype, attention=args.attention)
    params = random_params("vae", cfg)
    z = jnp.asarray(
        np.random.default_rng(1).standard_normal((args.batch, args.latent, args.latent, 4), dtype=np.float32)
    )
    jitted = jax.jit(lambda p, z: AutoencoderKL(cfg).apply({"params": p}, z, method=AutoencoderKL.decode))
    start = time.perf_counter()
    compiled = jitted.lower(params, z).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    info = dict(compile_s=compile_s, flops=float(cost.get("flops", 0.0)), device=str(jax.devices()[0]))
    info["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
    if args.tiled_memory:  # compile only: what a 2048x2048 decode needs, tiled and untiled
        big = jax.ShapeDtypeStruct((1, 256, 256, 4), jnp.float32)
        tiled = jax.jit(lambda p, z: tiled_decode(cfg, p, z)).lower(params, big).compile()
        info["tiled_2048_temp_gib"] = tiled.memory_analysis().temp_size_in_bytes / 2**30
        info["untiled_2048_temp_gib"] = jitted.lower(params, big).compile().memory_analysis().temp_size_in_bytes / 2**30
    return lambda: compiled(params, z).block_until_ready(), info


def torch_setup(args):
    """-> (decode(), info) for diffusers' AutoencoderKL under `torch.no_grad()`."""
    import torch
    from diffusers import AutoencoderKL

    config = json.loads(CONFIGS.read_text())["sdxl-base-1.0"]["vae"]
    dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16)[args.dtype]
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(config).eval()  # PyTorch's default (fan-in) init
    if dtype != torch.float32:
        model = model.to(dtype)
    z = torch.randn(args.batch, 4, args.latent, args.latent, dtype=dtype)

    def decode():
        with torch.no_grad():
            return model.decode(z).sample

    return decode, dict(threads=torch.get_num_threads(), device="cpu")


def serve(args) -> None:
    """Worker: set up and warm up, report, then run one timed decode per 'run' line on stdin."""
    decode, info = (jax_setup if args.worker == "jax" else torch_setup)(args)
    decode()  # warm-up
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        decode()
        print(json.dumps(dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)), flush=True)


class Worker:
    """A framework's worker process, kept alive between timed decodes."""

    def __init__(self, framework: str, args, tiled_memory: bool):
        flags = {"--batch": args.batch, "--latent": args.latent, "--dtype": args.dtype, "--attention": args.attention}
        cmd = [sys.executable, __file__, "--worker", framework, *(str(x) for kv in flags.items() for x in kv)]
        cmd += ["--tiled_memory"] if tiled_memory else []
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        self.name = framework
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=64, help="latent side; pixels = 8x")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", default="xla", help="a key of ATTENTION_IMPLS (JAX side)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh pairs of worker processes")
    parser.add_argument(
        "--reps", type=int, default=4, help="alternating JAX/PyTorch decodes per round, after a warm-up"
    )
    parser.add_argument("--tiled_memory", action="store_true", help="report XLA temp memory of a 2048^2 decode")
    parser.add_argument("--worker", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args)
        return

    cpus = f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.1f}"
    print(
        f"SDXL VAE decode: batch {args.batch}, {8 * args.latent}x{8 * args.latent} "
        f"({args.latent}x{args.latent} latent), "
        f"{args.dtype}, {args.rounds} rounds x {args.reps} alternating pairs, {cpus}",
        flush=True,
    )
    jax_t, torch_t, jax_c, torch_c, ratios, jax_info, torch_info, compiles = [], [], [], [], [], None, None, []
    for r in range(args.rounds):
        jax_w, torch_w = Worker("jax", args, args.tiled_memory and r == 0), Worker("torch", args, False)
        jax_info, torch_info = jax_info or jax_w.info, torch_w.info
        compiles.append(jax_w.info["compile_s"])
        print(f"round {r + 1}/{args.rounds} (XLA compile {jax_w.info['compile_s']:.1f} s)", flush=True)
        for _ in range(args.reps):
            j, t = jax_w.run(), torch_w.run()
            jax_t.append(j["wall"])
            torch_t.append(t["wall"])
            jax_c.append(j["cpu"])
            torch_c.append(t["cpu"])
            ratios.append(j["wall"] / t["wall"])
            print(
                f"  jax {j['wall']:6.2f} s (cpu {j['cpu']:6.1f} s)   torch {t['wall']:6.2f} s (cpu {t['cpu']:6.1f} s)"
                f"   ratio {ratios[-1]:.3f}   load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        jax_w.close()
        torch_w.close()
    flops = jax_info["flops"]
    jax_s, torch_s = statistics.median(jax_t), statistics.median(torch_t)
    cpu_ratio = statistics.median(jax_c) / statistics.median(torch_c)
    print(f"device: jax {jax_info['device']}, torch {torch_info['device']} ({torch_info['threads']} threads)")
    print(f"XLA compile: {statistics.median(compiles):.1f} s (median); XLA temp memory {jax_info['temp_gib']:.2f} GiB")
    print(f"FLOPs (XLA cost analysis of the Flax graph): {flops / 1e12:.3f} TFLOP per decode")
    print(
        f"median decode: jax {jax_s:.3f} s ({flops / jax_s / 1e9:.1f} GFLOP/s), torch {torch_s:.3f} s; "
        f"fastest: jax {min(jax_t):.3f} s, torch {min(torch_t):.3f} s"
    )
    if args.tiled_memory:
        print(
            f"2048x2048 decode, XLA temp memory: tiled (64-latent tiles) {jax_info['tiled_2048_temp_gib']:.2f} GiB, "
            f"untiled {jax_info['untiled_2048_temp_gib']:.2f} GiB"
        )
    # Each pair runs back to back, so both sides see about the same load from other processes.
    print(
        f"RATIO jax/torch = {statistics.median(ratios):.3f} (median of {len(ratios)} back-to-back pairs; "
        f"ratio of medians {jax_s / torch_s:.3f}; of median CPU times {cpu_ratio:.3f}; target <= 1.0)"
    )


if __name__ == "__main__":
    main()
