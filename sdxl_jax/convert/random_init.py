"""Freshly initialised whole pipelines: matching configs and random parameters for every component.

Used by tests (a tiny pipeline needs no torch) and by benchmarks (the full SDXL architecture with
random weights, built in seconds); from the shell it writes one in this project's format, a stand-in
checkpoint for trying `sample.py`.

    weights = random_weights("base", tiny_configs("base"), seed=0)      # a PipelineWeights
    python -m sdxl_jax.convert.random_init ckpt/random_tiny --model base --size tiny --seed 0
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdxl_jax.convert.components import COMPONENTS
from sdxl_jax.convert.pipeline_weights import PipelineWeights
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

TINY_TIME_ID_DIM = 4  # UNetConfig.tiny's time_id_embed_dim


def tiny_configs(model: str = "base") -> dict:
    """Component configs of a tiny SDXL-shaped pipeline that fit together: context = CLIP-L ‖ bigG widths
    (16 + 32 = 48), y = pooled bigG (16) + 6 (base) or 5 (refiner) micro-conditioning scalars x 4.

    The text encoders keep the real vocabulary and 77 positions, so the real tokenizer drives them.
    """
    text = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT_LENGTH)
    text_g = CLIPTextConfig.tiny(hidden_size=32, num_heads=4, activation="gelu", projection_dim=16, **text)
    configs = {"vae": VAEConfig.tiny(), "text_encoder_2": text_g}
    if model == "base":
        configs["text_encoder"] = CLIPTextConfig.tiny(hidden_size=16, num_heads=2, **text)
        configs["unet"] = UNetConfig.tiny()
    elif model == "refiner":
        configs["unet"] = UNetConfig.tiny(context_dim=32, adm_in_channels=16 + 5 * TINY_TIME_ID_DIM)
    else:
        raise ValueError(f"model must be 'base' or 'refiner', got {model!r}")
    return configs


def sdxl_configs(model: str = "base") -> dict:
    """The real SDXL 1.0 component configs."""
    configs = {"vae": VAEConfig.sdxl(), "text_encoder_2": CLIPTextConfig.openclip_vit_bigg14()}
    if model == "base":
        configs |= {"unet": UNetConfig.sdxl_base(), "text_encoder": CLIPTextConfig.clip_vit_l14()}
    elif model == "refiner":
        configs["unet"] = UNetConfig.sdxl_refiner()
    else:
        raise ValueError(f"model must be 'base' or 'refiner', got {model!r}")
    return configs


def _random_leaf(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    """Kernels ~ N(0, 1/fan_in) (fan_in: every axis but the last), embeddings ~ N(0, 0.02²), biases small,
    norm scales near 1: activations stay O(1) through any depth, and every parameter matters."""
    noise = rng.standard_normal(shape, np.float32)
    if name == "bias":
        noise *= 0.02
    elif name == "scale":
        noise = 1.0 + 0.1 * noise
    elif name == "kernel" and len(shape) > 1:
        noise /= np.sqrt(np.prod(shape[:-1]))
    else:
        noise *= 0.02
    return jnp.asarray(noise, dtype)  # on the device leaf by leaf: the host holds one leaf at a time


def random_params(name: str, cfg, seed: int = 0):
    """One component's random params (device arrays)."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(COMPONENTS[name].abstract_params(cfg))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _random_leaf(rng, path[-1].key, leaf.shape, leaf.dtype), abstract
    )


def random_weights(model: str, configs: dict, seed: int = 0) -> PipelineWeights:
    """Random parameters for every component, as device arrays, built from the param tree's shapes
    (`jax.eval_shape`; no model is run, so even the full SDXL architecture takes seconds). For tests and
    benchmarks; training from scratch uses the modules' own initialisers (`train.state`)."""
    components = {}
    for i, (name, cfg) in enumerate(sorted(configs.items())):
        components[name] = (cfg, random_params(name, cfg, seed * 1000 + i))
    return PipelineWeights(model, components, {"source": f"random weights (seed {seed})"})


def main(argv=None) -> None:
    """`python -m sdxl_jax.convert.random_init OUT [--model base|refiner] [--size tiny|sdxl] [--seed N] [--overwrite]`:
    write a random pipeline in this project's format (a stand-in checkpoint for trying sample.py)."""
    import argparse
    import shutil
    from pathlib import Path

    from sdxl_jax.convert.pipeline_weights import FORMAT_NAME, is_project, save_project

    parser = argparse.ArgumentParser(prog="python -m sdxl_jax.convert.random_init", description=main.__doc__)
    parser.add_argument("out")
    parser.add_argument("--model", choices=("base", "refiner"), default="base")
    parser.add_argument("--size", choices=("tiny", "sdxl"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        if not args.overwrite:
            print(f"{out} exists; kept as it is (--overwrite replaces it)")
            return
        if not is_project(out):
            raise SystemExit(f"{out} exists and is not an {FORMAT_NAME} checkpoint; not touching it")
        shutil.rmtree(out)
    configs = (tiny_configs if args.size == "tiny" else sdxl_configs)(args.model)
    weights = random_weights(args.model, configs, args.seed)
    path = save_project(weights, args.out)
    what = f"a random {args.size} SDXL {args.model} ({weights.num_parameters():,} parameters, seed {args.seed})"
    print(f"wrote {what} to {path}")


if __name__ == "__main__":
    main()
