"""The trainer's config skeleton: every entry a run reads, in one place; `configs/*.py` fill it in.

    config = skeleton(models, data)   # models: a `Models`; data: the data source's ConfigDict
    config.num_steps = ...                          # then each config sets what differs

Every entry is present in every training config (the trainer never calls `config.get(key, default)`),
so any run can be shortened or redirected from the command line: `--config.num_steps=10
--config.mesh.fsdp=8 --config.data.source=synthetic`. `check(config)` rejects inconsistent values
before anything is built.
"""

import dataclasses

import ml_collections

from sdxl_jax.diffusion.losses import WEIGHTINGS
from sdxl_jax.diffusion.parameterisation import PARAMETERISATIONS
from sdxl_jax.sampling import SamplingOptions
from sdxl_jax.sharding import FSDP_RULES, check_rules
from sdxl_jax.train.lora import spec_from_config, text_encoders
from sdxl_jax.train.optim import LR_SCHEDULES, OPTIMIZERS
from sdxl_jax.train.state import Models

PREDICTIONS = tuple(PARAMETERISATIONS)
EXPORT_FORMATS = ("none", "project", "diffusers", "single_file", "lora")
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
    c.model = model_entries(models)
    c.init_from = ""  # a PipelineWeights path (diffusers folder, single file, project folder); "" = random init
    c.train_text_encoders = False
    c.lora = lora_defaults()
    c.diffusion = diffusion_defaults()
    c.optimizer = optimizer_defaults()
    c.ema = ml_collections.ConfigDict({"decay": 0.9999, "warmup": True})
    c.data = data
    c.validation = ml_collections.ConfigDict({
        "every": 0, "prompts": ("a photo of a cat",), "steps": 20, "sampler": "euler", "schedule": "leading",
        "guidance_scale": 5.0,
        "height": 1024, "width": 1024, "seed": 0, "aesthetic_score": 6.0,
    })  # fmt: skip
    c.export_on_finish = "none"
    c.export_ema = True
    c.peak_flops_per_device = 197e12  # TPU v5e bf16; MFU is reported against it
    c.malloc_huge_pages = False  # restart train.py with malloc on huge pages (train/huge_pages.py; CPU runs)
    return c


def lora_errors(c: ml_collections.ConfigDict) -> list[str]:
    lo, errors = c.lora, []
    if c.export_on_finish == "lora" and not lo.rank:
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


def check(c: ml_collections.ConfigDict) -> None:
    """Loud errors for values that would otherwise fail deep inside a run (or, worse, not at all)."""
    errors = []
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
    if c.export_on_finish not in EXPORT_FORMATS:
        errors.append(f"export_on_finish {c.export_on_finish!r} not in {EXPORT_FORMATS}")
    errors += lora_errors(c)
    if c.validation.every:
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
