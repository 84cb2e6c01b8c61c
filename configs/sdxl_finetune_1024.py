"""SDXL base fine-tuning at ~1024² on SDXL's 26 multi-aspect buckets, offset noise 0.05, from converted weights.

    python train.py --config configs/sdxl_finetune_1024.py --workdir /runs/ft \
        --config.init_from=/weights/stable-diffusion-xl-base-1.0 --config.data.path=/data/images \
        --config.mesh.fsdp=8 --config.export_on_finish=single_file

`init_from` takes anything `load_pipeline_weights` reads (a diffusers folder, the single-file
`.safetensors`, this project's format). Argument: the UNet remat policy (default full: 1024² at
batch 1 per device has to fit 16 GiB on a TPU v5e; see `python -m sdxl_jax.plan`).
"""

from configs.sdxl_pretrain_256 import data_config, sdxl_models, validate_every
from sdxl_jax.train.config import skeleton


def get_config(arg=None):
    c = skeleton(sdxl_models(arg or "full"), data_config("sdxl"))
    c.init_from = ""  # set on the command line: the run starts from SDXL's weights
    c.activation_constraints = True  # the models' activation layouts pinned: half the planned memory (README, planner)
    c.update(num_steps=10_000, batch_size=64, log_every=10, checkpoint_every=500)
    c.diffusion.offset_noise = 0.05
    c.optimizer.update(learning_rate=1e-5, warmup_steps=500, schedule="cosine", decay_steps=10_000, end_factor=0.1)
    c.ema.decay = 0.999
    validate_every(c, 500, 1024)
    return c
