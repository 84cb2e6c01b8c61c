"""Generation speed: our compiled pipeline vs diffusers' StableDiffusionXLPipeline, side by side.

    python bench/generate.py --part tiny     # (a) tiny SDXL-shaped pipeline, 20 Euler steps, CFG, CPU
    python bench/generate.py --part full     # (b) full SDXL base architecture, 512², 4 Euler steps, CFG, batch 1
    python bench/generate.py --part gpu      # (c) on an accelerator: 1024², 20 steps, CFG 8, bf16, batch 8

(a) The same random weights in both (ours exported with `export_diffusers`, loaded by diffusers'
`from_pretrained`), both in this process, timed alternately call by call after a warm-up each; the
headline is the median of the per-pair ratios (ours / diffusers; target <= 0.5: the loop must not pay
Python per step). (b) Each side in its own subprocess, one after the other (two fp32 copies of SDXL do
not fit in 24 GB): first-call time (ours: compilation + run), then the median of `--reps` steady calls;
target ratio <= 1.0. Random weights, so the images are noise; speed does not depend on the values.
(c) images/s and MFU against `--peak_tflops` (H100 SXM dense bf16: 989), with 281 TFLOP per image
(SDXL.md: 20 steps x 2 (CFG) x UNet at 1024² + text encoders + VAE decode). fp32 on CPU for (a)/(b).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "fixtures" / "sdxl_diffusers_configs.json"
PROMPT = "a photograph of an astronaut riding a horse"
TFLOP_PER_IMAGE_1024_20_STEPS = 281.0


def ours_pipeline(weights, dtype="fp32"):
    from sdxl_jax.pipeline import Pipeline

    return Pipeline.from_weights(weights, dtype=dtype, release_host_copies=True)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def part_tiny(args) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdxl_jax.convert.export import export_diffusers
    from sdxl_jax.convert.random_init import random_weights, tiny_configs

    weights = random_weights("base", tiny_configs("base"))
    folder = Path(tempfile.mkdtemp()) / "tiny"
    export_diffusers(weights, folder)
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    ours = ours_pipeline(weights)
    size = args.size or 128
    noise = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4)).astype(np.float32)
    run_ours = lambda: ours.generate(PROMPT, height=size, width=size, steps=20, guidance_scale=5.0, latents=noise)

    def run_theirs():
        with torch.no_grad():
            theirs(
                PROMPT,
                height=size,
                width=size,
                num_inference_steps=20,
                guidance_scale=5.0,
                latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                output_type="np",
            )

    first = timed(run_ours)
    timed(run_theirs)
    pairs = [(timed(run_ours), timed(run_theirs)) for _ in range(args.reps)]
    ratios = [o / t for o, t in pairs]
    return dict(
        part="tiny",
        size=size,
        steps=20,
        cfg=5.0,
        ours_first_call_s=first,
        ours_s=statistics.median(o for o, _ in pairs),
        diffusers_s=statistics.median(t for _, t in pairs),
        ratio_median=statistics.median(ratios),
        ratios=ratios,
        target="<= 0.5",
    )


def full_ours(args) -> dict:
    import numpy as np

    from sdxl_jax.convert.random_init import random_weights, sdxl_configs

    start = time.perf_counter()
    pipe = ours_pipeline(random_weights("base", sdxl_configs("base")), args.dtype)
    build = time.perf_counter() - start
    size = args.size or 512
    noise = np.random.default_rng(0).standard_normal((args.batch, size // 8, size // 8, 4)).astype(np.float32)
    options = dict(height=size, width=size, steps=args.steps, guidance_scale=args.guidance)
    run = lambda: pipe.generate([PROMPT] * args.batch, latents=noise, **options)
    first = timed(run)
    steady = [timed(run) for _ in range(args.reps)]
    return dict(
        build_s=build,
        first_call_s=first,
        steady_s=statistics.median(steady),
        steady=steady,
        compile_s=first - statistics.median(steady),
    )


def full_diffusers(args) -> dict:
    import numpy as np
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from sdxl_jax.tokenizer import ASSETS_DIR

    configs = json.loads(CONFIGS.read_text())["sdxl-base-1.0"]
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"]))
        text_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**configs["text_encoder_2"]))
    vocab, merges = str(ASSETS_DIR / "vocab.json"), str(ASSETS_DIR / "merges.txt")
    tokenizers = [
        transformers.CLIPTokenizer(vocab, merges, pad_token=pad, model_max_length=77) for pad in ("<|endoftext|>", "!")
    ]
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_l,
        text_encoder_2=text_g,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]),
    )
    pipe.set_progress_bar_config(disable=True)
    build = time.perf_counter() - start
    size = args.size or 512
    noise = torch.from_numpy(
        np.random.default_rng(0).standard_normal((args.batch, 4, size // 8, size // 8)).astype(np.float32)
    )

    def run():
        with torch.no_grad():
            pipe(
                [PROMPT] * args.batch,
                height=size,
                width=size,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                latents=noise,
                output_type="np",
            )

    first = timed(run)
    steady = [timed(run) for _ in range(args.reps)]
    return dict(build_s=build, first_call_s=first, steady_s=statistics.median(steady), steady=steady)


def part_full(args) -> dict:
    results = {}
    for side in ("ours", "diffusers"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            side,
            "--reps",
            str(args.reps),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--guidance",
            str(args.guidance),
            "--dtype",
            args.dtype,
        ]
        if args.size:
            cmd += ["--size", str(args.size)]
        print(f"running {side} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{side} worker failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{side}: {results[side]}", file=sys.stderr, flush=True)
    ratio = results["ours"]["steady_s"] / results["diffusers"]["steady_s"]
    return dict(
        part="full",
        size=args.size or 512,
        steps=args.steps,
        cfg=args.guidance,
        batch=args.batch,
        dtype=args.dtype,
        **results,
        ratio=ratio,
        target="<= 1.0",
        load_average=os.getloadavg(),
    )


def part_gpu(args) -> dict:
    import jax

    args.size, args.steps, args.guidance, args.dtype = args.size or 1024, 20, 8.0, "bf16"
    result = full_ours(args)
    images_per_s = args.batch / result["steady_s"]
    tflops = TFLOP_PER_IMAGE_1024_20_STEPS * (args.size / 1024) ** 2 * images_per_s
    return dict(
        part="gpu",
        device=str(jax.devices()[0].device_kind),
        batch=args.batch,
        **result,
        images_per_s=images_per_s,
        achieved_tflops=tflops,
        mfu=tflops / args.peak_tflops,
        target=">= 1.5 images/s",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("tiny", "full", "gpu"), default="tiny")
    parser.add_argument("--reps", type=int, default=5, help="timed calls (pairs for --part tiny)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=0, help="image side (default 128 tiny, 512 full, 1024 gpu)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((full_ours if args.worker == "ours" else full_diffusers)(args)))
        return
    if args.part == "gpu":
        args.batch = args.batch if args.batch > 1 else 8
    result = {"tiny": part_tiny, "full": part_full, "gpu": part_gpu}[args.part](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
