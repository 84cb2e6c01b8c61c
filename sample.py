"""Generate images with SDXL: prompts in, PNGs out (with the settings embedded the way SD web UIs do).

    python sample.py --config configs/sdxl_base.py --config.checkpoint=PATH --prompt "a cat" \
        [--prompts_file F] [--negative_prompt ...] [--n 4] [--steps 30] [--guidance 5.0] [--sampler euler] \
        [--seed 0] [--width 1024 --height 1024] [--refiner PATH --denoising_end 0.8] \
        [--lora style.safetensors:0.8 ...] [--vae sdxl_vae.safetensors] --outdir out/

The flags are shorthands for the config fields of the same meaning (`--config.steps` etc. work too).
Image k (counting over all prompts and their n copies) uses seed `seed + k`, recorded in its PNG, so any
single image can be regenerated alone. Each batch is one compiled call; the first pays the compilation
(cached on disk across runs, see `compilation.enable_compilation_cache`).
"""

import json
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image, PngImagePlugin

from sdxl_jax import __version__, storage
from sdxl_jax import pipeline as pipeline_lib
from sdxl_jax.convert.lora import parse_loras
from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.sampling import SamplingOptions

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    "configs/sdxl_base.py",
    "sampling config (configs/sdxl_base.py, or a training config with a `sample` section such as configs/demo.py)",
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "a text file with one prompt per line")
_OUTDIR = flags.DEFINE_string("outdir", None, "where the PNGs go (config.outdir)")
_LORA = flags.DEFINE_multi_string(
    "lora", [], "a LoRA file merged into the model, PATH[:SCALE] (repeatable; added to config.loras)"
)
# Shorthand flags for the config fields of the same name (--guidance: guidance_scale), by type.
_SHORTHANDS = {
    flags.DEFINE_string: ("negative_prompt", "sampler", "schedule", "refiner", "vae"),
    flags.DEFINE_integer: ("n", "steps", "seed", "width", "height", "batch_size"),
    flags.DEFINE_float: ("guidance", "denoising_end"),
}
_FIELDS = {"guidance": "guidance_scale"}
_SHORT_FLAGS = {
    name: define(name, None, f"shorthand for --config.{_FIELDS.get(name, name)}")
    for define, names in _SHORTHANDS.items()
    for name in names
}

# Sampler names as the SD web UIs write them into PNG infotext.
WEBUI_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "ddim": "DDIM",
}
WEBUI_SCHEDULES = {"karras": "Karras", "sgm": "SGM Uniform", "turbo": "SGM Uniform"}


def sampling_config(config):
    """The sampling settings: the config itself (configs/sdxl_base.py) or a training config's `sample`
    section (configs/demo.py: one file for training and sampling; override as --config.sample.steps=...)."""
    return config.sample if "sample" in config else config


def apply_shorthands(config) -> None:
    for name, flag in _SHORT_FLAGS.items():
        if flag.value is not None:
            setattr(config, _FIELDS.get(name, name), flag.value)
    if _OUTDIR.value is not None:
        config.outdir = _OUTDIR.value
    if _LORA.value:
        config.loras = ",".join(filter(None, [config.loras, *_LORA.value]))


def read_prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        path = Path(_PROMPTS_FILE.value)
        if not path.is_file():
            raise app.UsageError(f"--prompts_file {path}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise app.UsageError("no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE")
    return prompts


def sampling_options(config) -> SamplingOptions:
    """The options of every generation call. The refiner split needs a refiner checkpoint, and a
    denoising_end > 0 wins over refiner_strength."""
    unset = {}
    if not config.refiner:
        unset = dict(denoising_end=None, refiner_strength=None)
    elif config.denoising_end > 0:
        unset = dict(refiner_strength=None)
    return SamplingOptions.from_config(config, **unset)


def check_config(config) -> None:
    """Errors for bad names and counts, before any weights are read."""
    try:
        sampling_options(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if config.n < 1 or config.batch_size < 1:
        raise app.UsageError("n and batch_size must be >= 1")


def round_sizes(config, multiple: int) -> None:
    """Height and width rounded down to the pipeline's size multiple, with a warning."""
    for name in ("height", "width"):
        side = getattr(config, name)
        valid = max(multiple, side // multiple * multiple)
        if side != valid:
            logging.warning("%s %d is not a multiple of %d: using %d", name, side, multiple, valid)
            setattr(config, name, valid)


def vae_name(location) -> str:
    """A VAE's name for the PNG: its file or folder name, with the parent's for a pipeline's `vae/`."""
    p = storage.path(location)
    return f"{p.parent.name}/{p.name}" if p.name == "vae" else p.name


def infotext(config, prompt: str, seed: int, model: str) -> str:
    """The `parameters` PNG text chunk in the SD web UIs' format."""
    fields = {"Steps": config.steps, "Sampler": WEBUI_SAMPLERS[config.sampler]}
    if config.schedule in WEBUI_SCHEDULES:
        fields["Schedule type"] = WEBUI_SCHEDULES[config.schedule]
    fields |= {
        "CFG scale": config.guidance_scale,
        "Seed": seed,
        "Size": f"{config.width}x{config.height}",
        "Model": model,
    }
    if config.vae:  # as the web UIs record a VAE chosen by hand
        fields["VAE"] = vae_name(config.vae)
    if config.refiner and config.denoising_end > 0:
        fields |= {"Refiner": storage.path(config.refiner).name, "Refiner switch at": config.denoising_end}
    fields["Version"] = f"sdxl_jax {__version__}"
    tags = "".join(f" <lora:{storage.path(path).stem}:{scale:g}>" for path, scale in parse_loras(config.loras))
    lines = [prompt + tags]  # as the web UIs record a LoRA: a tag in the prompt
    if config.negative_prompt:
        lines.append(f"Negative prompt: {config.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax's per-file INFO lines drown the progress output
    config = sampling_config(_CONFIG.value)
    apply_shorthands(config)
    if not config.checkpoint:
        raise app.UsageError(
            "no checkpoint: set --config.checkpoint=PATH (this project's format, a diffusers "
            "folder or an SDXL .safetensors); see README 'Using real SDXL weights'"
        )
    prompts = read_prompts()
    check_config(config)
    try:  # a bad --outdir fails now, not after the model is loaded and the first batch sampled
        storage.check_writable(config.outdir, "--outdir")
    except storage.StorageError as e:
        raise app.UsageError(str(e)) from None
    if config.compilation_cache != "none":
        cache = pipeline_lib.enable_compilation_cache(config.compilation_cache or None)
        print(f"compilation cache: {cache}")
    start = time.perf_counter()
    try:
        pipe = pipeline_lib.Pipeline.load(
            config.checkpoint, refiner=config.refiner or None, dtype=config.dtype,
            loras=parse_loras(config.loras), lora_strict=config.lora_strict, vae=config.vae or None,
        )  # fmt: skip
    except (FileNotFoundError, storage.StorageError, ConversionError) as e:
        raise app.UsageError(str(e)) from None
    loras = "".join(f" + LoRA {path} x {scale:g}" for path, scale in parse_loras(config.loras))
    vae = f" + VAE {config.vae}" if config.vae else ""
    print(
        f"loaded {config.checkpoint}{' + ' + config.refiner if config.refiner else ''}{loras}{vae} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    round_sizes(config, pipe.size_multiple)
    options = sampling_options(config)
    print("settings: " + json.dumps({k: v for k, v in config.to_dict().items() if k != "compilation_cache"}))

    jobs = [(prompt, config.seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(config.n))]
    outdir = storage.path(config.outdir)
    model = storage.path(config.checkpoint).name
    negative = config.negative_prompt or None
    written = 0
    size = min(config.batch_size, len(jobs))
    for b in range(0, len(jobs), size):
        batch = jobs[b : b + size]
        padded = batch + [batch[-1]] * (size - len(batch))  # same shape every batch: one compilation
        t0 = time.perf_counter()
        images = pipe.generate([p for p, _ in padded], negative, seed=[s for _, s in padded], options=options)
        seconds = time.perf_counter() - t0
        for (prompt, seed), image in zip(batch, images):
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", infotext(config, prompt, seed, model))
            with (outdir / f"{seed:08d}.png").open("wb") as f:
                Image.fromarray(image).save(f, format="PNG", pnginfo=info)
            written += 1
        print(
            f"batch {b // size + 1}/{-(-len(jobs) // size)}: {len(batch)} image(s) in "
            f"{seconds:.2f} s ({len(batch) / seconds:.2f} images/s){' (includes compilation)' if b == 0 else ''}"
        )
    print(f"wrote {written} PNG(s) to {outdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
