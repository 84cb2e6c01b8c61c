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

import ml_collections

VARIANTS = ("", "refiner", "turbo")


def get_config(arg=None):
    variant = arg or ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(v or '(none)' for v in VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # required: set with --config.checkpoint=PATH
    c.refiner = ""  # a refiner checkpoint; used with denoising_end or refiner_strength
    c.dtype = "bf16"  # UNet + text encoders (the VAE decodes in fp32)
    c.height = 1024
    c.width = 1024
    c.steps = 30
    c.sampler = "euler"  # euler | euler_a | heun | dpmpp_2m | dpmpp_2m_sde | ddim
    c.schedule = "leading"  # leading | trailing | linspace | karras | sgm | turbo
    c.guidance_scale = 5.0
    c.guidance_rescale = 0.0
    c.negative_prompt = ""
    c.seed = 0
    c.n = 1  # images per prompt
    c.batch_size = 4  # images per compiled call (the last batch is padded to it: one compilation)
    c.denoising_end = 0.0  # > 0: the base stops there and the refiner finishes (ensemble of experts)
    c.refiner_strength = 0.0  # > 0: instead the refiner re-noises the base's image to this strength
    c.aesthetic_score = 6.0
    c.negative_aesthetic_score = 2.5
    c.prompt_mode = "truncate"  # or "chunked": prompts over 75 tokens in 75-token chunks
    c.compilation_cache = ""  # persistent XLA cache dir; "" = ~/.cache/sdxl_jax/xla, "none" = off
    c.outdir = "samples"
    if variant == "refiner":
        c.steps = 40
        c.denoising_end = 0.8
    elif variant == "turbo":
        c.update(height=512, width=512, steps=1, sampler="euler_a", schedule="turbo", guidance_scale=0.0)
    return c
