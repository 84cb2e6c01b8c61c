"""SDXL-Turbo's training: adversarial diffusion distillation (ADD) of SDXL base into a 1-4 step student at 512².

    python train.py --config configs/sdxl_turbo_add.py --workdir gs://BUCKET/turbo \
        --config.init_from=gs://BUCKET/weights/sd_xl_base_1.0.safetensors --config.data.path=gs://BUCKET/images \
        --config.distillation.dinov2_path=gs://BUCKET/weights/dinov2-small \
        --config.distillation.dinov2_image_path=gs://BUCKET/weights/dinov2-large \
        --config.distributed.enabled=True --config.mesh.fsdp=-1
    python -m sdxl_jax.plan --config configs/sdxl_turbo_add.py --target cpu:8 \
        --config.distillation.dinov2_path=... --config.distillation.dinov2_image_path=...   # memory per device

The student and the frozen teacher both start from `init_from` (any SDXL base checkpoint: the released
one, or your fine-tune, which is what the student will then imitate). ADD's published settings
(README, "Distilling SDXL"): 512², lambda 2.5 on the pixel-space distillation loss with c(t) = alpha_t
(the ablations' default), R1 with gamma 1e-5, 4 student timesteps ending at the last (pure noise there),
the discriminator's heads on DINOv2 ViT-S/14 (`facebook/dinov2-small`: a transformers folder or its
`model.safetensors`) conditioned on the pooled bigG text and DINOv2 ViT-L/14's CLS embedding of the real
image (`facebook/dinov2-large`). The student samples with the turbo schedule
(`sample.py --steps 1..4 --sampler euler_a --schedule trailing --guidance 0`).
Not published, chosen here: the teacher's CFG scale drawn from U[1, 8] per example (as the one public
ADD script does), DINOv2's input size 224 (StyleGAN-T's), the learning rates (AdamW 1e-5 for the
student, 1e-4 with betas (0, 0.999) for the heads), batch 128, EMA 0.999.

Argument: comma-separated switches — `nfsd` (the NFSD distillation target, which ADD's final model used:
teacher CFG scale 7.5 as in the NFSD paper, its negative prompt), `teacher` (the discriminator on the
frozen teacher UNet's encoder instead of DINOv2: no extra weights), and a UNet remat policy
(`none` | `minimal` | `full`, default full).
"""

from configs.sdxl_pretrain_256 import data_config, sdxl_models, validate_every
from sdxl_jax.train.config import skeleton

REMAT = ("none", "minimal", "full")


def get_config(arg=None):
    switches = set(filter(None, (arg or "").split(",")))
    if unknown := switches - {"nfsd", "teacher", *REMAT}:
        raise ValueError(f"unknown switches {sorted(unknown)}; known: nfsd, teacher, {', '.join(REMAT)}")
    remat = [s for s in switches if s in REMAT]
    if len(remat) > 1:
        raise ValueError(f"one remat policy, got {remat}")
    c = skeleton(sdxl_models(remat[0] if remat else "full"), data_config("512x512"))
    c.objective = "add"
    c.init_from = ""  # set on the command line: the student and the teacher start from SDXL's weights
    c.activation_constraints = True
    c.data.caption_dropout = 0.0  # the teacher's unconditional branch is built in the step
    c.update(num_steps=20_000, batch_size=128, log_every=10, checkpoint_every=500)
    c.optimizer.update(learning_rate=1e-5, warmup_steps=500, schedule="constant", weight_decay=0.0)
    c.ema.decay = 0.999
    c.distillation.update(guidance_min=1.0, guidance_max=8.0, features="dinov2")
    if "nfsd" in switches:
        c.distillation.update(weighting="nfsd", guidance_min=7.5, guidance_max=7.5)
    if "teacher" in switches:
        c.distillation.features = "teacher"
    c.distillation.discriminator_optimizer.update(learning_rate=1e-4, b1=0.0, b2=0.999)
    validate_every(c, 500, 512)
    c.validation.update(steps=4, sampler="euler_a", schedule="trailing", guidance_scale=0.0)
    c.export_on_finish = "single_file"
    return c
