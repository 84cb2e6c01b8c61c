"""Freshly initialised whole pipelines: matching configs and random parameters for every component.

Used by tests (a tiny pipeline needs no torch), by benchmarks (the full SDXL architecture with random
weights) and as the starting point of training from scratch.

    weights = random_weights("base", tiny_configs("base"), seed=0)      # a PipelineWeights
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdxl_jax.convert.pipeline_weights import PipelineWeights
from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel
from sdxl_jax.models.unet import UNet, UNetConfig
from sdxl_jax.models.vae import AutoencoderKL, VAEConfig
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


def _init(name: str, cfg, key: jax.Array):
    if name == "unet":
        f = cfg.downsample_factor
        y = None if cfg.adm_in_channels is None else jnp.zeros((1, cfg.adm_in_channels))
        args = (jnp.zeros((1, f, f, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.context_dim)), y)
        return UNet(cfg).init(key, *args)["params"]
    if name == "vae":
        f = cfg.downsample_factor
        return AutoencoderKL(cfg).init(key, jnp.zeros((1, f, f, cfg.in_channels)))["params"]
    ids = jnp.zeros((1, CONTEXT_LENGTH), jnp.int32)
    return CLIPTextModel(cfg).init(key, ids, jnp.zeros((1,), jnp.int32))["params"]


def random_weights(model: str, configs: dict, seed: int = 0) -> PipelineWeights:
    """Random parameters (the modules' own initialisers) for every component, as numpy arrays."""
    components = {}
    for i, (name, cfg) in enumerate(sorted(configs.items())):
        init = jax.jit(lambda key, name=name, cfg=cfg: nn.meta.unbox(_init(name, cfg, key)))
        params = init(jax.random.fold_in(jax.random.key(seed), i))
        components[name] = (cfg, jax.tree.map(np.asarray, params))
    return PipelineWeights(model, components, {"source": f"random init (seed {seed})"})
