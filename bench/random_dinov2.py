"""Random DINOv2 ViT-S/14 and ViT-L/14 in the layout of `facebook/dinov2-small` and `-large` (transformers
folders: config.json + model.safetensors, fp32): stand-ins for planning ADD's full-size step where the
real weights cannot be downloaded.

    python bench/random_dinov2.py runs/dinov2_random      # -> runs/dinov2_random/{small,large}
    python -m sdxl_jax.plan --config configs/sdxl_turbo_add.py --target cpu:8 \
        --config.distillation.dinov2_path=runs/dinov2_random/small \
        --config.distillation.dinov2_image_path=runs/dinov2_random/large
"""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.convert import save_dinov2
from sdxl_jax.models.dinov2 import Dinov2Config, Dinov2Model, dinov2_param_count


def main(root: str) -> None:
    for name, cfg in (("small", Dinov2Config.vit_s14()), ("large", Dinov2Config.vit_l14())):
        pixels = jnp.zeros((1, cfg.patch_size, cfg.patch_size, cfg.num_channels))
        init = jax.jit(lambda key, cfg=cfg, x=pixels: nn.meta.unbox(Dinov2Model(cfg).init(key, x)["params"]))
        params = init(jax.random.key(0))
        folder = save_dinov2(Path(root) / name, cfg, params)
        print(f"{folder}: {dinov2_param_count(cfg):,} parameters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
