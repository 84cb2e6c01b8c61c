"""Sampling with SDXL base (optionally + refiner, or SDXL-Turbo): the settings `sample.py` reads.

    python sample.py --config configs/sdxl_base.py --config.checkpoint=sd_xl_base_1.0.safetensors \
        --prompt "a photo of an astronaut riding a horse" --n 4 --outdir out/
    python sample.py --config configs/sdxl_base.py:refiner --config.checkpoint=BASE \
        --config.refiner=sd_xl_refiner_1.0.safetensors --prompt "..."      # ensemble of experts at 0.8
    python sample.py --config configs/sdxl_base.py:turbo --config.checkpoint=sd_xl_turbo_1.0.safetensors \
        --prompt "..." --width 512 --height 512                              # 1 step, no CFG

`checkpoint` / `refiner` take anything `convert.load_pipeline_weights` reads (this project's format,
a diffusers folder, an original single file). Argument: `refiner` or `turbo` (default: base alone).
"""

from sdxl_jax.sampling import SamplingOptions, sample_config

VARIANTS = ("", "refiner", "turbo")


def get_config(arg=None):
    """Every field sample.py reads (`sampling.sample_config`): the SamplingOptions' defaults (1024², 30
    Euler steps on the leading grid, CFG 5, no refiner), bf16, 4 images per call; then the variant's."""
    variant = arg or ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(v or '(none)' for v in VARIANTS)}")
    options = SamplingOptions()
    if variant == "refiner":
        options = options.replace(steps=40, denoising_end=0.8)
    elif variant == "turbo":
        options = options.replace(
            height=512, width=512, steps=1, sampler="euler_a", schedule="turbo", guidance_scale=0.0
        )
    return sample_config(options)
