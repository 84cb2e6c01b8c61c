"""SDXL base LoRA at ~1024² on SDXL's 26 multi-aspect buckets: rank 32, alpha 16, LR 1e-4, from converted weights.

    python train.py --config configs/sdxl_lora_1024.py --workdir /runs/lora \
        --config.init_from=/weights/sd_xl_base_1.0.safetensors --config.data.path=/data/images \
        --config.mesh.fsdp=8
    # -> /runs/lora/export/lora.safetensors, a kohya-format LoRA (--config.lora.format=diffusers for
    #    pytorch_lora_weights.safetensors); sample with it: sample.py --lora /runs/lora/export/lora.safetensors

The base stays frozen (sharded as for a full fine-tune); adapters of rank 32 on every linear layer of
the UNet's transformers (kohya's default targets) train, merged into the kernels inside the step
(`sdxl_jax/train/lora.py`). Argument: comma-separated switches — `te` (adapters on both text encoders
too, at `optimizer.text_encoder_learning_rate` 5e-5), `bf16` (frozen weights kept in bf16: half the
base's memory; adapter updates smaller than half a bf16 step of a weight are then invisible to the
forward pass until they grow, README "LoRA"), `conv` (LoCon: the resnets' convolutions too, conv rank
16, alpha 8), and a UNet remat policy (`none` | `minimal` | `full`, default full).
"""

from configs.sdxl_pretrain_256 import data_config, sdxl_models, validate_every
from sdxl_jax.train.config import skeleton
from sdxl_jax.train.state import Models

REMAT = ("none", "minimal", "full")


def lora_models(remat: str, bf16: bool) -> Models:
    models = sdxl_models(remat)
    if not bf16:
        return models
    frozen = dict(param_dtype="bfloat16")
    return Models(models.kind, models.unet.replace(**frozen), models.vae, models.text_encoder.replace(**frozen),
                  models.text_encoder_2.replace(**frozen))  # fmt: skip


def get_config(arg=None):
    switches = set(filter(None, (arg or "").split(",")))
    if unknown := switches - {"te", "bf16", "conv", *REMAT}:
        raise ValueError(f"unknown switches {sorted(unknown)}; known: te, bf16, conv, {', '.join(REMAT)}")
    remat = [s for s in switches if s in REMAT]
    if len(remat) > 1:
        raise ValueError(f"one remat policy, got {remat}")
    c = skeleton(lora_models(remat[0] if remat else "full", "bf16" in switches), data_config("sdxl"))
    c.init_from = ""  # set on the command line: the run starts from SDXL's weights
    c.activation_constraints = True
    c.update(num_steps=2000, batch_size=16, log_every=10, checkpoint_every=250)
    c.lora.update(rank=32, alpha=16.0, targets="transformer")
    if "te" in switches:
        c.lora.text_encoders = "text_encoder,text_encoder_2"
    if "conv" in switches:
        c.lora.update(targets="conv", conv_rank=16, conv_alpha=8.0)
    c.diffusion.offset_noise = 0.0357  # kohya's recommended value for SDXL
    c.optimizer.update(
        learning_rate=1e-4, text_encoder_learning_rate=5e-5, warmup_steps=100, schedule="cosine", decay_steps=2000,
        end_factor=0.1, weight_decay=1e-2,
    )  # fmt: skip
    c.ema.decay = 0.999
    c.export_on_finish = "lora"
    validate_every(c, 250, 1024)
    return c
