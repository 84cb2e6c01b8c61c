"""UNet forward: the jitted Flax UNet vs diffusers' PyTorch UNet, full SDXL base, random weights.

    python bench/unet_forward.py                       # fp32, batch 2 (a CFG pair), 512x512 (64x64 latent)
    python bench/unet_forward.py --latent 128 --dtype bf16 --peak_tflops 989   # on a GPU: MFU vs bf16 peak

Each framework runs in its own process (a full fp32 copy is ~10 GB), the two alternate for --rounds
rounds, and the summary quotes medians over every timed repetition. The timed region is one forward
call, synchronised (`block_until_ready` / `torch.cuda.synchronize`), with inputs already on device.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sdxl_diffusers_configs.json"
CONTEXT_LEN = 77


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdxl_jax.models import UNet, UNetConfig
    from sdxl_jax.models.unet import abstract_params

    cfg = UNetConfig.sdxl_base().replace(
        dtype=args.dtype, param_dtype="float32" if args.dtype == "float32" else args.dtype
    )
    abstract = jax.tree_util.tree_map(lambda b: b.value, abstract_params(cfg), is_leaf=lambda b: hasattr(b, "value"))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32), s.dtype), abstract
    )
    b, h = args.batch, args.latent
    x = jnp.asarray(rng.standard_normal((b, h, h, 4), dtype=np.float32))
    t = jnp.full((b,), 500.0)
    ctx = jnp.asarray(rng.standard_normal((b, CONTEXT_LEN, cfg.context_dim), dtype=np.float32))
    y = jnp.asarray(rng.standard_normal((b, cfg.adm_in_channels), dtype=np.float32))

    forward = jax.jit(UNet(cfg).apply)
    start = time.perf_counter()
    compiled = forward.lower({"params": params}, x, t, ctx, y).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    compiled({"params": params}, x, t, ctx, y).block_until_ready()  # warm-up
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        compiled({"params": params}, x, t, ctx, y).block_until_ready()
        times.append(time.perf_counter() - start)
    return dict(times=times, compile_s=compile_s, flops=float(cost.get("flops", 0.0)), device=str(jax.devices()[0]))


def torch_worker(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16)[args.dtype]
    config = json.loads(CONFIGS.read_text())["sdxl-base-1.0"]["unet"]
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    model = model.to_empty(device=device).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # to_empty leaves garbage (possibly NaN/denormal) memory: fill it
            p.normal_(0.0, 0.02, generator=gen)
    b, h = args.batch, args.latent
    x = torch.randn(b, 4, h, h, device=device, dtype=dtype)
    t = torch.full((b,), 500.0, device=device)
    ctx = torch.randn(b, CONTEXT_LEN, 2048, device=device, dtype=dtype)
    cond = dict(
        text_embeds=torch.randn(b, 1280, device=device, dtype=dtype),
        time_ids=torch.full((b, 6), 1024.0, device=device, dtype=dtype),
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            model(x, t, ctx, added_cond_kwargs=cond)
        sync()

    forward()  # warm-up
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    return dict(times=times, threads=torch.get_num_threads(), device=device)


def run_worker(framework: str, args) -> dict:
    flags = {"--batch": args.batch, "--latent": args.latent, "--dtype": args.dtype, "--reps": args.reps}
    cmd = [sys.executable, __file__, "--worker", framework, *(str(x) for kv in flags.items() for x in kv)]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(CONFIGS.parents[2])}
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  {framework:5s} "
        + " ".join(f"{s:.2f}s" for s in result["times"])
        + (f"  (compile {result['compile_s']:.1f}s)" if "compile_s" in result else ""),
        flush=True,
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent side; pixels = 8x")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=2, help="alternating JAX/PyTorch process pairs")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per process, after one warm-up")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for the dtype, to report MFU")
    parser.add_argument("--worker", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((jax_worker if args.worker == "jax" else torch_worker)(args)))
        return

    print(
        f"SDXL base UNet forward: batch {args.batch}, {8 * args.latent}x{8 * args.latent} "
        f"({args.latent}x{args.latent} latent), "
        f"{args.dtype}, {args.rounds} rounds x {args.reps} reps, {os.cpu_count()} CPUs",
        flush=True,
    )
    jax_runs, torch_runs = [], []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        jax_runs.append(run_worker("jax", args))
        torch_runs.append(run_worker("torch", args))
    jax_s = statistics.median(t for run in jax_runs for t in run["times"])
    torch_s = statistics.median(t for run in torch_runs for t in run["times"])
    flops = jax_runs[0]["flops"]
    print(
        f"device: jax {jax_runs[0]['device']}, torch {torch_runs[0]['device']} ({torch_runs[0].get('threads')} threads)"
    )
    print(f"XLA compile: {statistics.median(r['compile_s'] for r in jax_runs):.1f} s (median)")
    print(
        f"FLOPs (XLA cost analysis): {flops / 1e12:.3f} TFLOP per call, {flops / args.batch / 1e12:.3f} TFLOP per image"
    )
    print(
        f"median forward: jax {jax_s:.3f} s ({flops / jax_s / 1e9:.1f} GFLOP/s), "
        f"torch {torch_s:.3f} s ({flops / torch_s / 1e9:.1f} GFLOP/s)"
    )
    if args.peak_tflops:
        print(
            f"MFU: jax {flops / jax_s / (args.peak_tflops * 1e12):.1%}, "
            f"torch {flops / torch_s / (args.peak_tflops * 1e12):.1%}"
        )
    print(f"RATIO jax/torch = {jax_s / torch_s:.3f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
