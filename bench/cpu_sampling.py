"""Speed of the Pipeline's CPU settings against XLA's defaults, on one loaded model, alternating calls.

    python bench/cpu_sampling.py CHECKPOINT [--size 512] [--dtype fp32] [--reps 2]

"new": what `Pipeline` does on CPU (chunked attention, the VAE decoding one image per device at a time,
`generation.compiler_options("cpu")`); "old": xla attention, the batch decoded at once, XLA's default
options (at 1024² that program holds an fp32 copy of a bf16 model: run "old" only where it fits).
1 image, 2 Euler steps, CFG 5; the first call of each compiles and is not counted. Prints the medians
and their ratio (new / old).
"""

import argparse
import dataclasses
import statistics
import time

from sdxl_jax import pipeline as pipeline_lib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    new = pipeline_lib.Pipeline.load(args.checkpoint, dtype=args.dtype)
    m = new.models
    base = m.base.replace(unet_cfg=m.base.unet_cfg.replace(attention="xla"))
    old = dataclasses.replace(new, models=m.replace(base=base, vae_cfg=m.vae_cfg.replace(attention="xla")))
    on_cpu = pipeline_lib.platform_of
    defaults = lambda mesh: "cpu (XLA defaults)"  # not "cpu": no decode groups, no compiler options
    times = {"new": [], "old": []}
    for rep in range(args.reps + 1):
        for name, pipe in (("new", new), ("old", old)):
            pipeline_lib.platform_of = on_cpu if name == "new" else defaults
            start = time.perf_counter()
            pipe.generate(["a photo"], seed=rep, height=args.size, width=args.size, steps=2, guidance_scale=5.0)
            seconds = time.perf_counter() - start
            print(f"{name} call {rep}: {seconds:.1f} s{' (compiles)' if rep == 0 else ''}", flush=True)
            if rep:
                times[name].append(seconds)
    pipeline_lib.platform_of = on_cpu
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["new"] / medians["old"]
    print(f"medians: new {medians['new']:.1f} s, old {medians['old']:.1f} s; new / old {ratio:.3f}")


if __name__ == "__main__":
    main()
