"""What the ADD discriminator's heads read: its two frozen feature networks (`config.distillation.features`).

    network = feature_network(config)                       # TeacherFeatures | Dinov2Features
    inputs = network.features(frozen, latents, pixels, cond, keys)  # one `[B, N_k, C_k]` per head
    image = network.image_embed(frozen, real_pixels, pure_noise)    # `[B, D]` or None; text: the pooled

- "teacher": the frozen teacher UNet's own encoder maps (`models/unet_features.py`, the named levels'
  outputs) on latents re-noised at t_d ~ U[disc_t_min, disc_t_max) (latent adversarial distillation's
  design); the same `keys` (two) give fakes and reals the same t_d and noise. Needs no weights of its
  own; the heads are conditioned on the pooled text alone.
- "dinov2": ADD's (§3.2): DINOv2 ViT-S/14 on decoded pixels, StyleGAN-T's preprocessing (x in [-1, 1]
  -> [0, 1], `F.interpolate(mode="area")` to `dinov2_size`², ImageNet mean/std), heads on the
  embeddings and every (layers / 4)-th layer's output with the CLS token added to each patch token
  (`projected_discriminator.head_features`). Conditioning: the pooled text and, with
  `dinov2_image_path`, the CLS embedding (`pooled`, after the final layernorm) of DINOv2 ViT-L/14 on the
  real image, zeroed for examples whose student input was pure noise (the student saw nothing of that
  image; dg845's ADD script does the same at its last timestep).

Fakes and reals go through the same decoder (the real latents are decoded too, not the data's pixels),
so the first stage's reconstruction error is no cue for the heads. The weights come from
`dinov2_path` / `dinov2_image_path` (`convert.load_dinov2`: a transformers folder, whose config.json
gives the architecture, or a weights file taken as ViT-S/14 / ViT-L/14), held fp32 in `frozen`
(`"dinov2"`, `"dinov2_image"`), sharded by the run's rules, computed in the UNet's compute dtype.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdxl_jax import storage
from sdxl_jax.convert.dinov2 import dinov2_config_at, load_dinov2
from sdxl_jax.diffusion import losses
from sdxl_jax.models import UNetConfig
from sdxl_jax.models.dinov2 import Dinov2Config, Dinov2Model
from sdxl_jax.models.dinov2 import abstract_params as abstract_dinov2
from sdxl_jax.models.projected_discriminator import dinov2_feature_channels, head_features
from sdxl_jax.models.unet_features import feature_channels, unet_feature_tokens
from sdxl_jax.train.objective import alphas_cumprod
from sdxl_jax.train.state import models_from_config, place

FEATURE_NETWORKS = ("teacher", "dinov2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` fp32 matrix M with `M @ x` = PyTorch's 1-D `mode="area"` resize
    (`adaptive_avg_pool1d`): output i averages inputs floor(i in / out) ... ceil((i + 1) in / out) - 1."""
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def area_resize(images: jax.Array, size: int) -> jax.Array:
    """`[B, H, W, C]` -> fp32 `[B, size, size, C]`, PyTorch's area resize (separable: one matrix per axis)."""
    rows = jnp.asarray(area_matrix(images.shape[1], size))
    cols = jnp.asarray(area_matrix(images.shape[2], size))
    highest = jax.lax.Precision.HIGHEST
    out = jnp.einsum("hi,bijc->bhjc", rows, images.astype(jnp.float32), precision=highest)
    return jnp.einsum("wj,bhjc->bhwc", cols, out, precision=highest)


def dinov2_pixels(images: jax.Array, size: int) -> jax.Array:
    """Decoded images in [-1, 1] `[B, H, W, 3]` -> DINOv2's input fp32 `[B, size, size, 3]` (StyleGAN-T's:
    to [0, 1], area resize, ImageNet normalisation)."""
    x = area_resize((images.astype(jnp.float32) + 1.0) * 0.5, size)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherFeatures:
    """The frozen teacher UNet's encoder maps on re-noised latents (see the module docstring)."""

    unet: UNetConfig
    names: tuple[str, ...]
    disc_t: tuple[int, int]
    table: tuple[float, ...]  # the training schedule's alphas_cumprod

    needs_pixels = False
    image_embed_dim = 0

    @property
    def channels(self) -> tuple[int, ...]:
        return feature_channels(self.unet, self.names)

    def abstract_frozen(self) -> dict:
        return {}  # reads frozen["teacher"], which every ADD run has

    def frozen_params(self, shardings: dict) -> dict:
        return {}

    def features(self, frozen: dict, latents, pixels, cond, keys) -> list[jax.Array]:
        k_t, k_eps = keys
        t = jax.random.randint(k_t, (latents.shape[0],), *self.disc_t)
        eps = jax.random.normal(k_eps, latents.shape, jnp.float32)
        x_t = losses.noisy_latents(latents, eps, jnp.asarray(self.table)[t])
        return unet_feature_tokens(self.unet, frozen["teacher"], x_t, t, cond.context, cond.y, self.names)

    def image_embed(self, frozen: dict, real_pixels, pure_noise) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class Dinov2Features:
    """DINOv2 ViT-S on decoded pixels, ViT-L's CLS embedding of the real image (see the module docstring)."""

    network: Dinov2Config
    image_network: Dinov2Config | None
    path: str
    image_path: str
    size: int

    needs_pixels = True

    @property
    def channels(self) -> tuple[int, ...]:
        return dinov2_feature_channels(self.network)

    @property
    def image_embed_dim(self) -> int:
        return self.image_network.hidden_size if self.image_network else 0

    def _networks(self) -> dict[str, tuple[Dinov2Config, str]]:
        out = {"dinov2": (self.network, self.path)}
        if self.image_network:
            out["dinov2_image"] = (self.image_network, self.image_path)
        return out

    def abstract_frozen(self) -> dict:
        return {name: abstract_dinov2(cfg) for name, (cfg, _) in self._networks().items()}

    def frozen_params(self, shardings: dict) -> dict:
        """The networks' weights, read from their paths and placed by `shardings[name]`."""
        out = {}
        for name, (cfg, path) in self._networks().items():
            as_file = None if storage.path(path).is_dir() else cfg  # a folder's config.json gives it
            loaded_cfg, params = load_dinov2(path, as_file, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            if loaded_cfg != cfg:
                raise ValueError(f"{path} changed while the run started: {loaded_cfg} != {cfg}")
            out[name] = place(params, shardings[name])
        return out

    def features(self, frozen: dict, latents, pixels, cond, keys) -> list[jax.Array]:
        out = Dinov2Model(self.network).apply({"params": frozen["dinov2"]}, dinov2_pixels(pixels, self.size))
        return [h.astype(jnp.float32) for h in head_features(out.hidden_states, self.network)]

    def image_embed(self, frozen: dict, real_pixels, pure_noise) -> jax.Array | None:
        """ViT-L's CLS embedding of the real images `[B, D]` fp32, zero where `pure_noise` `[B]`."""
        if not self.image_network:
            return None
        net = Dinov2Model(self.image_network)
        cls = net.apply({"params": frozen["dinov2_image"]}, dinov2_pixels(real_pixels, self.size)).pooled
        return jnp.where(pure_noise[:, None], 0.0, jax.lax.stop_gradient(cls).astype(jnp.float32))


def feature_network(config: ml_collections.ConfigDict) -> TeacherFeatures | Dinov2Features:
    """The run's feature network from `config.distillation` (the DINOv2 architectures read from their
    paths' config.json, nothing loaded)."""
    d = config.distillation
    unet = models_from_config(config.model).unet
    if d.features == "teacher":
        names = tuple(filter(None, d.feature_names.split(",")))
        table = tuple(float(a) for a in alphas_cumprod(config.diffusion))
        return TeacherFeatures(unet, names, (d.disc_t_min, d.disc_t_max), table)
    if d.features == "dinov2":
        dtypes = {"dtype": unet.dtype, "param_dtype": "float32"}
        network = dinov2_config_at(d.dinov2_path, Dinov2Config.vit_s14(), **dtypes)
        image = dinov2_config_at(d.dinov2_image_path, Dinov2Config.vit_l14(), **dtypes) if d.dinov2_image_path else None
        for cfg in filter(None, (network, image)):
            if d.dinov2_size % cfg.patch_size:
                raise ValueError(f"distillation.dinov2_size {d.dinov2_size} is not a multiple of DINOv2's "
                                 f"{cfg.patch_size}-pixel patches (the remainder would be dropped)")  # fmt: skip
        return Dinov2Features(network, image, d.dinov2_path, d.dinov2_image_path, d.dinov2_size)
    raise ValueError(f"distillation.features {d.features!r} not in {FEATURE_NETWORKS}")
