"""Sampling entry point. For now: one forward pass of a UNet preset on random inputs, printing what ran.

    python sample.py --preset tiny
Real text-to-image generation arrives with the sampler/pipeline issue.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models import UNet, UNetConfig

PRESETS = {"tiny": UNetConfig.tiny, "sdxl_base": UNetConfig.sdxl_base, "sdxl_refiner": UNetConfig.sdxl_refiner}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--latent", type=int, nargs=2, default=(16, 24), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = PRESETS[args.preset]()
    print(f"UNet preset {args.preset}: {cfg}")
    print(f"random weights (seed {args.seed}), latent {args.latent[0]}x{args.latent[1]}, batch 2")
    k = jax.random.split(jax.random.key(args.seed), 5)
    x = jax.random.normal(k[0], (2, *args.latent, cfg.in_channels))
    t = jnp.array([999.0, 1.0])
    ctx = jax.random.normal(k[1], (2, 77, cfg.context_dim))
    y = None if cfg.adm_in_channels is None else jax.random.normal(k[2], (2, cfg.adm_in_channels))
    start = time.perf_counter()
    params = jax.jit(UNet(cfg).init)(k[3], x, t, ctx, y)["params"]
    n = sum(p.size for p in jax.tree.leaves(nn.meta.unbox(params)))
    out = jax.jit(UNet(cfg).apply)({"params": params}, x, t, ctx, y)
    print(f"{n:,} parameters; output {out.shape} {out.dtype}, mean |eps| {float(jnp.abs(out).mean()):.4f}; "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
