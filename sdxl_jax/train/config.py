"""The trainer's config skeleton: every entry a run reads, in one place; `configs/*.py` fill it in.

    config = skeleton(models, data)   # models: a `Models`; data: the data source's ConfigDict
    config.num_steps = ...                          # then each config sets what differs

Every entry is present in every training config (the trainer never calls `config.get(key, default)`),
so any run can be shortened or redirected from the command line: `--config.num_steps=10
--config.mesh.fsdp=8 --config.data.source=synthetic`. `check(config)` rejects inconsistent values
before anything is built.

`objective` picks what the run trains (`step.OBJECTIVES`): "diffusion" (the UNet, with `diffusion`,
`lora`, `train_text_encoders`), "autoencoder" (the VAE alone, `model.kind = "autoencoder"`, with
`autoencoder`: ldm's first-stage losses, a PatchGAN discriminator with its own optimiser, LPIPS) or
"add" (adversarial diffusion distillation of the UNet into a few-step student, with `distillation`).
"""

import dataclasses

import ml_collections

from sdxl_jax.diffusion.losses import WEIGHTINGS
from sdxl_jax.diffusion.parameterisation import PARAMETERISATIONS
from sdxl_jax.models import PatchDiscriminatorConfig
from sdxl_jax.sampling import SamplingOptions
from sdxl_jax.sharding import FSDP_RULES, check_rules
from sdxl_jax.train.add_features import FEATURE_NETWORKS
from sdxl_jax.train.autoencoder_losses import AutoencoderLossConfig
from sdxl_jax.train.data import DATA_SOURCES
from sdxl_jax.train.distillation import WEIGHTINGS as DISTILL_WEIGHTINGS
from sdxl_jax.train.lora import spec_from_config, text_encoders
from sdxl_jax.train.optim import LR_SCHEDULES, OPTIMIZERS
from sdxl_jax.train.state import Models
from sdxl_jax.train.step import OBJECTIVES

PREDICTIONS = tuple(PARAMETERISATIONS)
EXPORT_FORMATS = ("none", "project", "diffusers", "single_file", "lora")
AUTOENCODER_EXPORT_FORMATS = ("none", "diffusers", "single_file")  # an AutoencoderKL folder, an ldm-layout file
LORA_FORMATS = ("kohya", "diffusers")


def model_entries(models: Models) -> ml_collections.ConfigDict:
    """`config.model`: the kind and each component's config dataclass as a dict (None: absent)."""
    as_dict = lambda cfg: None if cfg is None else dataclasses.asdict(cfg)
    return ml_collections.ConfigDict({
        "kind": models.kind, "unet": as_dict(models.unet), "vae": as_dict(models.vae),
        "text_encoder": as_dict(models.text_encoder), "text_encoder_2": as_dict(models.text_encoder_2),
    })  # fmt: skip


def diffusion_defaults() -> ml_collections.ConfigDict:
    """`config.diffusion`: SDXL's objective (eps, uniform t over 1000 steps, no offset noise or shift)."""
    return ml_collections.ConfigDict({
        "prediction": "epsilon", "weighting": "none", "min_snr_gamma": 5.0, "offset_noise": 0.0,
        "t_min": 0, "t_max": 1000, "timestep_shift": 1.0, "zero_terminal_snr": False,
    })  # fmt: skip


def optimizer_defaults() -> ml_collections.ConfigDict:
    """`config.optimizer`: AdamW at a constant 1e-4 (text encoders 1e-5), clipped at norm 1."""
    return ml_collections.ConfigDict({
        "name": "adamw", "muon_beta": 0.95,  # the UNet's optimiser: "adamw" or "muon" (train/optim.py OPTIMIZERS)
        "learning_rate": 1e-4, "text_encoder_learning_rate": 1e-5, "schedule": "constant", "warmup_steps": 0,
        "decay_steps": 1000, "end_factor": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-2,
        "grad_clip_norm": 1.0, "accumulation_steps": 1,
    })  # fmt: skip


def lora_defaults() -> ml_collections.ConfigDict:
    """`config.lora`: off (rank 0). With rank > 0 the trainable components are frozen and adapters train
    (`train/lora.py`); their learning rates are `optimizer.learning_rate` (UNet) and
    `optimizer.text_encoder_learning_rate`."""
    return ml_collections.ConfigDict({
        "rank": 0, "alpha": 16.0,
        "targets": "transformer",  # "attention" | "transformer" (kohya's default) | "conv" (LoCon)
        "conv_rank": 0, "conv_alpha": 1.0,  # the 3x3 convs' under "conv" (conv_rank 0: rank, alpha)
        "text_encoders": "",  # comma-separated text_encoder, text_encoder_2: they get adapters too
        "dropout": 0.0,  # rank dropout (train/lora.py with_adapters)
        "format": "kohya",  # export_on_finish=lora: export/lora.safetensors (kohya) or
        # export/pytorch_lora_weights.safetensors (diffusers / PEFT)
    })  # fmt: skip


def autoencoder_defaults() -> ml_collections.ConfigDict:
    """`config.autoencoder` (read when `objective` is "autoencoder"): ldm's KL-f8 loss (`loss`: the fields
    of `AutoencoderLossConfig`), taming's PatchGAN (`discriminator`: `PatchDiscriminatorConfig`'s) with
    ldm's Adam (betas 0.5, 0.9, no weight decay, no clipping) at ldm's base LR for one example (ldm
    multiplies it by the batch size), and no LPIPS weights: a config that keeps `perceptual_weight` > 0
    names them, or asks for a random VGG16 (`lpips_random_vgg`), explicitly."""
    discriminator_optimizer = optimizer_defaults()
    discriminator_optimizer.update(learning_rate=4.5e-6, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip_norm=0.0)
    return ml_collections.ConfigDict({
        "decoder_only": False,  # train decoder + post_quant_conv only (the encoder, hence the latents, stay)
        "sample_posterior": True,  # decode a posterior sample (ldm), not its mean
        "loss": dataclasses.asdict(AutoencoderLossConfig()),
        "lpips_vgg16": "",  # torchvision's VGG16 weights (vgg16-397923af.pth or a safetensors of its keys)
        "lpips_heads": "",  # lpips' heads file (lpips/weights/v0.1/vgg.pth, shipped in the lpips package)
        "lpips_random_vgg": False,  # no VGG16 weights: a random trunk (heads from lpips_heads, or random >= 0)
        "discriminator": dataclasses.asdict(PatchDiscriminatorConfig()),
        "discriminator_init": "",  # a taming/ldm checkpoint (loss.discriminator.*) or a bare one; "" = random
        "discriminator_optimizer": discriminator_optimizer,
    })  # fmt: skip


NFSD_NEGATIVE_PROMPT = (  # the NFSD paper's
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


def distillation_defaults() -> ml_collections.ConfigDict:
    """`config.distillation` (read when `objective` is "add", `train/distillation.py`). ADD's published
    values where there are any (ADD.md): lambda 2.5, R1 gamma 1e-5, 4 student timesteps ending at the
    last with zero terminal SNR, c(t) = alpha_t; the rest (teacher CFG range, re-noising ranges, the
    heads' optimiser) are guesses, marked so in README's ADD section."""
    heads = optimizer_defaults()
    heads.update(learning_rate=1e-4, b1=0.0, b2=0.999, weight_decay=0.0, grad_clip_norm=0.0)
    return ml_collections.ConfigDict({
        "student_timesteps": (249, 499, 749, 999),  # the turbo sampler's trailing 4-step timesteps
        "zero_terminal_snr": True,  # the student's input at the last timestep is pure noise
        "teacher_t_min": 0, "teacher_t_max": 1000,  # t of the teacher's re-noising, U[min, max)
        "guidance_min": 1.0, "guidance_max": 1.0,  # the teacher's CFG scale, U[min, max]; 1 = no CFG
        "weighting": "exponential",  # c(t): exponential (alpha_t) | sds, nfsd (alpha_t / (2 s_t); nfsd's target)
        "nfsd_negative_prompt": NFSD_NEGATIVE_PROMPT,  # nfsd: delta_D's negative prompt (the NFSD paper's)
        "nfsd_t_switch": 200,  # nfsd: delta_D is eps_u below this t, eps_u - eps_negative from it
        "distill_weight": 2.5,  # lambda
        "adversarial_weight": 1.0,  # 0: distillation alone (the discriminator is not run)
        "features": "teacher",  # the discriminator's feature network: teacher | dinov2 (train/add_features.py)
        "feature_names": "down_blocks_1,down_blocks_2,mid_block",  # teacher: its UNet's maps, one head each
        "disc_t_min": 0, "disc_t_max": 1000,  # teacher: t of the discriminator's re-noising
        "dinov2_path": "",  # dinov2: ViT-S/14 weights (a transformers folder, or a file taken as ViT-S/14)
        "dinov2_image_path": "",  # dinov2: ViT-L/14 for the image embedding ("": the heads see text alone)
        "dinov2_size": 224,  # dinov2: the side the decoded images are area-resized to (StyleGAN-T's)
        "r1_gamma": 1e-5,
        "c_dim": 64, "kernel_size": 9, "group_size": 8,  # the heads (StyleGAN-T's)
        "discriminator_optimizer": heads,
    })  # fmt: skip


def skeleton(models: Models, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A complete training config with neutral values (uniform weighting, constant LR, no offset noise)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 8  # global, over all processes
    c.log_every = 10
    c.checkpoint_every = 500
    c.max_checkpoints = 3
    c.async_checkpointing = True
    c.max_consecutive_skips = 10  # non-finite steps in a row before the run stops
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # one size may be -1
    c.sharding_rules = FSDP_RULES
    c.activation_constraints = (
        False  # the models' activation annotations (sdxl_jax/sharding.py); on in the full-size configs
    )
    # jax.distributed: enabled with an empty coordinator = auto-detection (TPU pods, SLURM, ...)
    c.distributed = ml_collections.ConfigDict(
        {"enabled": False, "coordinator_address": "", "num_processes": 1, "process_id": 0}
    )
    c.objective = "autoencoder" if models.kind == "autoencoder" else "diffusion"  # a key of step.OBJECTIVES
    c.model = model_entries(models)
    # a PipelineWeights path (diffusers folder, single file, project folder); "" = random init. The
    # autoencoder's: a VAE (a diffusers AutoencoderKL folder, a pipeline folder's vae/, an ldm-layout file)
    c.init_from = ""
    c.train_text_encoders = False
    c.lora = lora_defaults()
    c.diffusion = diffusion_defaults()
    c.autoencoder = autoencoder_defaults()
    c.distillation = distillation_defaults()
    c.optimizer = optimizer_defaults()
    c.ema = ml_collections.ConfigDict({"decay": 0.9999, "warmup": True})
    c.data = data
    c.validation = ml_collections.ConfigDict({
        "every": 0, "prompts": ("a photo of a cat",), "steps": 20, "sampler": "euler", "schedule": "leading",
        "guidance_scale": 5.0,
        "height": 1024, "width": 1024, "seed": 0, "aesthetic_score": 6.0,
        # the autoencoder's: the first `num_images` images of this data config (one bucket) reconstructed
        "data": None, "num_images": 8,
    })  # fmt: skip
    c.export_on_finish = "none"  # one of EXPORT_FORMATS or several, comma-separated
    c.export_ema = True
    c.peak_flops_per_device = 197e12  # TPU v5e bf16; MFU is reported against it
    c.malloc_huge_pages = False  # restart train.py with malloc on huge pages (train/huge_pages.py; CPU runs)
    return c


def lora_errors(c: ml_collections.ConfigDict) -> list[str]:
    lo, errors = c.lora, []
    if "lora" in export_formats(c) and not lo.rank:
        errors.append("export_on_finish=lora needs lora.rank > 0")
    if lo.format not in LORA_FORMATS:
        errors.append(f"lora.format {lo.format!r} not in {LORA_FORMATS}")
    if not lo.rank:
        return errors
    try:
        spec_from_config(lo)
        text_encoders(lo)
    except ValueError as e:
        errors.append(str(e))
    if c.train_text_encoders:
        errors.append("with lora.rank > 0, text encoders get adapters through lora.text_encoders; "
                      "train_text_encoders (training them whole) must be False")  # fmt: skip
    if c.optimizer.name != "adamw":
        errors.append(f"LoRA adapters train with adamw, got optimizer.name {c.optimizer.name!r}")
    if not 0 <= lo.dropout < 1:
        errors.append(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    return errors


def export_formats(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`export_on_finish` as a tuple of formats ("none": empty)."""
    formats = tuple(f.strip() for f in c.export_on_finish.split(","))
    return () if formats == ("none",) else formats


def autoencoder_errors(c: ml_collections.ConfigDict) -> list[str]:
    """What does not fit the autoencoder objective (or fits it outside one)."""
    if c.objective != "autoencoder":
        return ["model.kind 'autoencoder' trains with objective 'autoencoder'"] if c.model.kind == "autoencoder" else []
    ae, errors = c.autoencoder, []
    if c.model.kind != "autoencoder":
        errors.append(f"objective 'autoencoder' trains a VAE alone: model.kind 'autoencoder', not {c.model.kind!r}")
    if c.lora.rank or c.train_text_encoders:
        errors.append("objective 'autoencoder' has no LoRA, no text encoders (lora.rank 0, train_text_encoders False)")
    if bad := [f for f in export_formats(c) if f not in AUTOENCODER_EXPORT_FORMATS]:
        errors.append(f"export_on_finish {bad} not for an autoencoder; formats: {AUTOENCODER_EXPORT_FORMATS}")
    for name, make in (("loss", AutoencoderLossConfig), ("discriminator", PatchDiscriminatorConfig)):
        try:
            make(**ae[name].to_dict())
        except (TypeError, ValueError) as e:
            errors.append(f"autoencoder.{name}: {e}")
    lpips_paths = [k for k in ("lpips_vgg16", "lpips_heads") if ae[k]]
    if ae.loss.perceptual_weight == 0:
        if lpips_paths or ae.lpips_random_vgg:
            errors.append(f"autoencoder.loss.perceptual_weight is 0 (LPIPS off): {lpips_paths or 'lpips_random_vgg'} "
                          "would be ignored; unset them, or give the perceptual term a weight")  # fmt: skip
    elif ae.lpips_random_vgg and ae.lpips_vgg16:
        errors.append("autoencoder.lpips_random_vgg and autoencoder.lpips_vgg16 both set: pick one")
    elif not ae.lpips_random_vgg and lpips_paths != ["lpips_vgg16", "lpips_heads"]:
        errors.append(f"autoencoder.loss.perceptual_weight {ae.loss.perceptual_weight} needs LPIPS: set "
                      "autoencoder.lpips_vgg16 and lpips_heads, or lpips_random_vgg=True, "
                      "or perceptual_weight=0")  # fmt: skip
    if ae.decoder_only and not c.init_from:
        errors.append("autoencoder.decoder_only fine-tunes a trained VAE's decoder: set init_from")
    opt = ae.discriminator_optimizer
    if opt.name not in OPTIMIZERS or opt.schedule not in LR_SCHEDULES or opt.accumulation_steps < 1:
        errors.append(f"autoencoder.discriminator_optimizer: name {opt.name!r} (in {sorted(OPTIMIZERS)}), "
                      f"schedule {opt.schedule!r} (in {sorted(LR_SCHEDULES)}), accumulation_steps >= 1")  # fmt: skip
    if c.validation.every:
        v = c.validation.data
        if not isinstance(v, ml_collections.ConfigDict) or v.get("source") not in DATA_SOURCES:
            errors.append("validation.every > 0: validation.data must be a data config (a source of "
                          f"{sorted(DATA_SOURCES)}) holding the validation images")  # fmt: skip
        if c.validation.num_images < 1:
            errors.append(f"validation.num_images must be >= 1, got {c.validation.num_images}")
    return errors


def distillation_errors(c: ml_collections.ConfigDict) -> list[str]:
    """What does not fit the ADD objective."""
    if c.objective != "add":
        return []
    d, errors = c.distillation, []
    if c.model.kind == "autoencoder" or c.lora.rank or c.train_text_encoders:
        errors.append("objective 'add' distils a UNet: model.kind base or refiner, no LoRA, frozen text encoders")
    steps = tuple(d.student_timesteps)
    if not steps or list(steps) != sorted(set(steps)) or not 0 <= steps[0] or steps[-1] > 999:
        errors.append(f"distillation.student_timesteps {steps}: increasing, distinct, within [0, 999]")
    if d.zero_terminal_snr and c.diffusion.zero_terminal_snr and c.diffusion.prediction == "epsilon":
        errors.append("an epsilon model on a zero-terminal-SNR table has no x0 estimate at the last timestep: "
                      "diffusion.zero_terminal_snr False (the student's input is still pure noise there)")  # fmt: skip
    for name in ("teacher", "disc"):
        lo, hi = d[f"{name}_t_min"], d[f"{name}_t_max"]
        if not 0 <= lo < hi <= 1000:
            errors.append(f"need 0 <= distillation.{name}_t_min < {name}_t_max <= 1000, got {lo}, {hi}")
    if not 0 < d.guidance_min <= d.guidance_max:
        errors.append(f"need 0 < distillation.guidance_min <= guidance_max, got {d.guidance_min}, {d.guidance_max}")
    if d.weighting not in DISTILL_WEIGHTINGS:
        errors.append(f"distillation.weighting {d.weighting!r} not in {DISTILL_WEIGHTINGS}")
    if not 0 <= d.nfsd_t_switch <= 1000:
        errors.append(f"distillation.nfsd_t_switch must be within [0, 1000], got {d.nfsd_t_switch}")
    if d.features not in FEATURE_NETWORKS:
        errors.append(f"distillation.features {d.features!r} not in {FEATURE_NETWORKS}")
    if d.features == "dinov2" and not d.dinov2_path:
        errors.append("distillation.features 'dinov2' needs distillation.dinov2_path (DINOv2 ViT-S/14 weights)")
    if d.dinov2_size <= 0:
        errors.append(f"distillation.dinov2_size must be > 0, got {d.dinov2_size}")
    if d.features != "dinov2" and (d.dinov2_path or d.dinov2_image_path):
        errors.append(f"distillation.dinov2_path / dinov2_image_path are read by features 'dinov2', not {d.features!r}")
    if d.weighting == "nfsd" and c.diffusion.zero_terminal_snr and d.nfsd_t_switch > 999 and d.teacher_t_max > 999:
        errors.append("nfsd below nfsd_t_switch divides by alpha_t, which is 0 at t 999 of a zero-terminal-SNR "
                      "table: nfsd_t_switch <= 999 (or teacher_t_max <= 999)")  # fmt: skip
    if d.distill_weight < 0 or d.adversarial_weight < 0 or d.distill_weight + d.adversarial_weight == 0:
        errors.append("distillation.distill_weight and adversarial_weight: >= 0, not both 0")
    return errors


def check(c: ml_collections.ConfigDict) -> None:
    """Loud errors for values that would otherwise fail deep inside a run (or, worse, not at all)."""
    errors = []
    if c.objective not in OBJECTIVES:
        errors.append(f"objective {c.objective!r} not in {sorted(OBJECTIVES)}")
    if c.diffusion.prediction not in PREDICTIONS:
        errors.append(f"diffusion.prediction {c.diffusion.prediction!r} not in {PREDICTIONS}")
    if c.diffusion.weighting not in WEIGHTINGS:
        errors.append(f"diffusion.weighting {c.diffusion.weighting!r} not in {WEIGHTINGS}")
    if not c.diffusion.timestep_shift > 0:
        errors.append(f"diffusion.timestep_shift must be > 0, got {c.diffusion.timestep_shift}")
    if not 0 <= c.diffusion.t_min < c.diffusion.t_max <= 1000:
        errors.append(f"need 0 <= diffusion.t_min < t_max <= 1000, got {c.diffusion.t_min}, {c.diffusion.t_max}")
    if c.optimizer.name not in OPTIMIZERS:
        errors.append(f"optimizer.name {c.optimizer.name!r} not in {sorted(OPTIMIZERS)}")
    if c.optimizer.schedule not in LR_SCHEDULES:
        errors.append(f"optimizer.schedule {c.optimizer.schedule!r} not in {sorted(LR_SCHEDULES)}")
    if c.optimizer.accumulation_steps < 1:
        errors.append(f"optimizer.accumulation_steps must be >= 1, got {c.optimizer.accumulation_steps}")
    if c.optimizer.grad_clip_norm < 0:
        errors.append(f"optimizer.grad_clip_norm must be >= 0 (0: no clipping), got {c.optimizer.grad_clip_norm}")
    formats = export_formats(c)
    if not formats and c.export_on_finish != "none" or any(f not in EXPORT_FORMATS[1:] for f in formats):
        errors.append(f"export_on_finish {c.export_on_finish!r}: 'none' or some of {EXPORT_FORMATS[1:]}")
    errors += lora_errors(c)
    errors += autoencoder_errors(c)
    errors += distillation_errors(c)
    if c.validation.every and c.objective in ("diffusion", "add"):
        try:
            SamplingOptions.from_config(c.validation)
        except ValueError as e:
            errors.append(f"validation: {e}")
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        errors.append(f"mesh sizes {sizes}: positive, at most one -1")
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "max_checkpoints"):
        if c[name] < 1:
            errors.append(f"{name} must be >= 1, got {c[name]}")
    if errors:
        raise ValueError("bad training config:\n  " + "\n  ".join(errors))
    check_rules(c.sharding_rules)
