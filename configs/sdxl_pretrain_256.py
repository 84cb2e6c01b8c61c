"""SDXL base pretraining, stage 1 (the paper): 256² fixed-area buckets, size and crop conditioning.

    python train.py --config configs/sdxl_pretrain_256.py --workdir gs://bucket/sdxl_256 \
        --config.data.source=prepared --config.data.path=gs://bucket/prepared_256

From scratch (random init), 600,000 steps at global batch 2048, 10% caption dropout. Argument:
the UNet remat policy (`none` | `minimal` | `full`, default minimal).
"""

import ml_collections

from sdxl_jax.data.loader import default_data_config
from sdxl_jax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdxl_jax.train.config import skeleton
from sdxl_jax.train.state import Models


def sdxl_models(remat: str = "minimal") -> Models:
    """SDXL base: fp32 master weights, bf16 compute for the UNet and text encoders; the VAE in fp32."""
    compute = dict(dtype="bfloat16", param_dtype="float32")
    # scan_layers: each transformer's blocks compiled once (nn.scan); checkpoints convert either way
    return Models(
        "base",
        UNetConfig.sdxl_base(remat=remat, scan_layers=True, **compute),
        VAEConfig.sdxl(),
        CLIPTextConfig.clip_vit_l14(**compute),
        CLIPTextConfig.openclip_vit_bigg14(**compute),
    )


def data_config(buckets: str) -> ml_collections.ConfigDict:
    """The grain loader's config (`sdxl_jax.data.loader`): an image folder by default (set `data.path`),
    the given bucket spec, 10% caption dropout."""
    c = default_data_config()
    c.buckets = buckets
    c.caption_dropout = 0.1
    return c


PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk")


def validate_every(c: ml_collections.ConfigDict, every: int, size: int, prompts=PROMPTS) -> None:
    """`c.validation`: every `every` steps, 20 sampler steps at `size`² for each of `prompts`."""
    c.validation.update(every=every, height=size, width=size, steps=20, prompts=prompts)


def get_config(arg=None):
    c = skeleton(sdxl_models(arg or "minimal"), data_config("area=256,step=64"))
    c.activation_constraints = True  # the models' activation layouts pinned: half the planned memory (README, planner)
    c.update(num_steps=600_000, batch_size=2048, log_every=50, checkpoint_every=2000)
    c.optimizer.update(learning_rate=1e-4, warmup_steps=10_000, schedule="constant", weight_decay=1e-2)
    c.ema.decay = 0.9999
    validate_every(
        c, 5000, 256, PROMPTS + ("a red cube on a blue sphere", "portrait of an old fisherman, studio lighting")
    )
    return c
