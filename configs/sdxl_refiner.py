"""The SDXL refiner: bigG-only conditioning with aesthetic scores, specialised on t < 200, ~1024².

    python train.py --config configs/sdxl_refiner.py --workdir /runs/refiner \
        --config.init_from=/weights/stable-diffusion-xl-refiner-1.0 --config.data.path=/data/images \
        --config.mesh.fsdp=8

Argument: the UNet remat policy (default full).
"""

from configs.sdxl_pretrain_256 import PROMPTS, data_config, validate_every
from sdxl_jax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdxl_jax.train.config import skeleton
from sdxl_jax.train.state import Models


def refiner_models(remat: str) -> Models:
    compute = dict(dtype="bfloat16", param_dtype="float32")
    # scan_layers: each transformer's blocks compiled once (nn.scan); checkpoints convert either way
    return Models(
        "refiner",
        UNetConfig.sdxl_refiner(remat=remat, scan_layers=True, **compute),
        VAEConfig.sdxl(),
        None,
        CLIPTextConfig.openclip_vit_bigg14(**compute),
    )


def get_config(arg=None):
    c = skeleton(refiner_models(arg or "full"), data_config("sdxl"))
    c.activation_constraints = True  # the models' activation layouts pinned: half the planned memory (README, planner)
    c.update(num_steps=10_000, batch_size=64, log_every=10, checkpoint_every=500)
    c.diffusion.t_max = 200  # the first 200 (low-noise) discrete levels
    c.optimizer.update(learning_rate=1e-5, warmup_steps=500, schedule="cosine", decay_steps=10_000, end_factor=0.1)
    c.ema.decay = 0.999
    validate_every(c, 500, 1024, PROMPTS[:1])  # at the skeleton's aesthetic score, 6.0
    return c
