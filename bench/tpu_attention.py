"""The full SDXL base UNet forward compiled for one TPU chip with `xla` and `flash` attention, side by side
(or for one H100 with `xla` and `cudnn`).

    JAX_PLATFORMS=cpu python bench/tpu_attention.py                     # v5e, 1024² (128² latent), batch 2, bf16
    JAX_PLATFORMS=cpu python bench/tpu_attention.py --target tpu:v6e:2x2 --latent 64 --backward
    JAX_PLATFORMS=cpu python bench/tpu_attention.py --target gpu:h100:8 --attention xla,cudnn   # needs jax[cuda12]

No TPU or GPU is needed: the program is compiled by libtpu (or XLA's GPU compiler, through the CUDA
plugin) for the first chip of the topology (`train/targets.py`),
with bf16 parameters and compute and random-free abstract inputs. For each attention kernel it prints
the compiler's temporaries and arguments, the HBM traffic of the compiled program (`hlo_traffic`: loops
times their trip counts), the model FLOPs (`flops.jaxpr_flops` of the XLA-attention program) and the
roofline lower bound on that chip; then each kernel's ratios to xla. `--backward` compiles the gradient of a
scalar of the output with respect to the parameters instead (what a train step adds). Each compile
takes minutes on this machine's 2 cores; these are compiler plans and bounds, not timings.
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from sdxl_jax.models import UNet, UNetConfig  # noqa: E402
from sdxl_jax.models.unet import abstract_params  # noqa: E402
from sdxl_jax.train.flops import jaxpr_flops  # noqa: E402
from sdxl_jax.train.hlo_traffic import memory_traffic  # noqa: E402
from sdxl_jax.train.targets import GiB, parse_target, roofline  # noqa: E402


def program(cfg: UNetConfig, backward: bool):
    model = UNet(cfg)

    def forward(params, x, t, context, y):
        return model.apply({"params": params}, x, t, context, y)

    if not backward:
        return forward
    return jax.grad(lambda params, *inputs: jnp.mean(forward(params, *inputs).astype(jnp.float32)))


def compile_one(attention: str, args, device) -> dict:
    cfg = UNetConfig.sdxl_base(dtype="bfloat16", param_dtype="bfloat16", attention=attention, scan_layers=True)
    whole = NamedSharding(jax.sharding.Mesh([device], ("x",)), PartitionSpec())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)
    params = jax.tree.map(
        lambda b: spec(b.value.shape, b.value.dtype), abstract_params(cfg), is_leaf=lambda b: hasattr(b, "value")
    )
    b, n = args.batch, args.latent
    inputs = (spec((b, n, n, 4), jnp.bfloat16), spec((b,), jnp.float32), spec((b, 77, 2048), jnp.bfloat16),
              spec((b, 2816), jnp.bfloat16))  # fmt: skip
    start = time.perf_counter()
    compiled = jax.jit(program(cfg, args.backward)).lower(params, *inputs).compile()
    seconds = time.perf_counter() - start
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        with open(os.path.join(args.hlo_dir, f"unet_{attention}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    reference = program(cfg.replace(attention="xla"), args.backward)
    flops = jaxpr_flops(jax.jit(reference).trace(params, *inputs).jaxpr)
    mem = compiled.memory_analysis()
    return {"temporaries": mem.temp_size_in_bytes, "arguments": mem.argument_size_in_bytes,
            "traffic": memory_traffic(compiled.as_text()), "flops": flops, "compile_s": seconds}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="tpu:v5e:2x2", help="a TPU or GPU target; its first chip is used")
    parser.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024² images)")
    parser.add_argument("--batch", type=int, default=2, help="batch (2 = one CFG pair)")
    parser.add_argument("--backward", action="store_true", help="compile the parameter gradient instead")
    parser.add_argument("--attention", default="xla,flash", help="comma-separated kernels to compare")
    parser.add_argument("--hlo_dir", default="", help="also write each compiled program's HLO text here")
    args = parser.parse_args()
    target = parse_target(args.target)
    devices = target.devices()
    _, peak, bandwidth = target.per_device(len(devices))
    what = "forward + backward" if args.backward else "forward"
    print(f"SDXL base UNet {what}, batch {args.batch}, {args.latent}² latent, bf16, one {target.generation} chip")
    results = {}
    for attention in args.attention.split(","):
        r = results[attention] = compile_one(attention, args, devices[0])
        bound = roofline(r["flops"], r["traffic"], peak, bandwidth)
        print(f"{attention:>6}: temporaries {r['temporaries'] / GiB:6.2f} GiB, "
              f"arguments {r['arguments'] / GiB:5.2f} GiB, "
              f"HBM traffic {r['traffic'] / 1e9:7.1f} GB, model FLOPs {r['flops'] / 1e12:5.1f} TFLOP, roofline "
              f"{bound['bound_s'] * 1e3:6.1f} ms (compute {bound['compute_s'] * 1e3:.1f}, memory "
              f"{bound['memory_s'] * 1e3:.1f}), compiled in {r['compile_s']:.0f} s", flush=True)  # fmt: skip
    for name, f in results.items():
        if name != "xla" and "xla" in results:
            x = results["xla"]
            print(f"{name} / xla: temporaries {f['temporaries'] / x['temporaries']:.2f}x, "
                  f"HBM traffic {f['traffic'] / x['traffic']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
