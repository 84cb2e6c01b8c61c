"""SDXL base pretraining, stage 2 (the paper): 512² fixed-area buckets, from the 256² stage's weights.

    python train.py --config configs/sdxl_pretrain_512.py --workdir gs://bucket/sdxl_512 \
        --config.init_from=gs://bucket/sdxl_256/export/diffusers --config.data.path=/data/images

200,000 steps at global batch 2048. Argument: the UNet remat policy (default minimal).
"""

from configs.sdxl_pretrain_256 import data_config, sdxl_models, validate_every
from sdxl_jax.train.config import skeleton


def get_config(arg=None):
    c = skeleton(sdxl_models(arg or "minimal"), data_config("area=512,step=64"))
    c.activation_constraints = True  # the models' activation layouts pinned: half the planned memory (README, planner)
    c.update(num_steps=200_000, batch_size=2048, log_every=50, checkpoint_every=2000)
    c.optimizer.update(learning_rate=1e-4, warmup_steps=1000, schedule="constant")
    validate_every(c, 5000, 512)
    return c
