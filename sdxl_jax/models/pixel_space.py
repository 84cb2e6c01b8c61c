"""A parameter-free "first stage": diffusion directly on pixels, patchified (space-to-depth).

The demo model (`configs/demo.py`) trains in pixel space instead of a VAE's latent space: nothing has
to be trained or downloaded first, and a small image is cheap enough for a CPU. To keep the UNet's grid
small, each `patch x patch` block of pixels becomes one "latent" position with `3 * patch²` channels:

    image [B, H, W, 3]  <->  latent [B, H/p, W/p, 3 p²]    (channel index = (dy * p + dx) * 3 + c)

`PixelSpace` has `AutoencoderKL`'s methods (`moments`, `encode`, `decode`), so the trainer, the samplers
and the pipeline take either; `first_stage(cfg)` returns the module for a config of either kind. The
posterior is a point mass (logvar at its clamp, -30: std 3e-7), so `encode(x).sample(key)` is
`encode(x).mode()` to well below a pixel level.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models import vae
from sdxl_jax.models.config import ModelConfig, check_positive
from sdxl_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, check_images, check_latents

POINT_MASS_LOGVAR = -30.0  # DiagonalGaussian's lower clamp


@dataclasses.dataclass(frozen=True)
class PixelSpaceConfig(ModelConfig):
    """Pixels as latents. `kind` tells a saved config apart from a `VAEConfig`."""

    kind: str = "pixels"
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int = 2
    scaling_factor: float = 1.0  # latents seen by the UNet = (pixels - shift) * scale, as for the VAE
    shift_factor: float | None = None
    dtype: str = "float32"  # unused (no compute), kept so pipeline code can treat both kinds alike
    param_dtype: str = "float32"

    def validate(self):
        if self.kind != "pixels":
            raise ValueError(f"PixelSpaceConfig.kind must be 'pixels', got {self.kind!r}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.in_channels != self.out_channels:
            got = f"{self.in_channels}, {self.out_channels}"
            raise ValueError(f"pixel space needs in_channels == out_channels, got {got}")
        check_positive("scaling_factor", self.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def downsample_factor(self) -> int:
        return self.patch_size


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, H/p, W/p, p*p*C]`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(z: jax.Array, p: int) -> jax.Array:
    """`[B, h, w, p*p*C]` -> `[B, h*p, w*p, C]` (the inverse of `space_to_depth`)."""
    b, h, w, d = z.shape
    z = z.reshape(b, h, w, p, p, d // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, h * p, w * p, d // (p * p))


class PixelSpace(nn.Module):
    """`AutoencoderKL`'s interface with the identity inside (up to patchifying); no parameters."""

    cfg: PixelSpaceConfig

    def moments(self, x: jax.Array) -> jax.Array:
        """x: `[B, H, W, C]` in [-1, 1] -> fp32 `[B, H/p, W/p, 2 * latent_channels]` (mean ‖ logvar)."""
        check_images(x, self.cfg.in_channels, self.cfg.patch_size)
        mean = space_to_depth(x.astype(jnp.float32), self.cfg.patch_size)
        return jnp.concatenate([mean, jnp.full_like(mean, POINT_MASS_LOGVAR)], axis=-1)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.moments(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """z: `[B, h, w, latent_channels]` -> fp32 image `[B, p*h, p*w, C]` (not clipped)."""
        check_latents(z, self.cfg.latent_channels)
        return depth_to_space(z.astype(jnp.float32), self.cfg.patch_size)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return self.decode(self.encode(x).mode())


FirstStageConfig = VAEConfig | PixelSpaceConfig


def first_stage(cfg: FirstStageConfig) -> nn.Module:
    """The module for a first-stage config: `AutoencoderKL` or `PixelSpace`. Call methods by name:
    `first_stage(cfg).apply({"params": p}, x, method="encode")`."""
    return PixelSpace(cfg) if isinstance(cfg, PixelSpaceConfig) else AutoencoderKL(cfg)


def first_stage_config_type(fields: dict) -> type:
    """The config dataclass a saved first-stage config (a JSON dict) is: its `kind` names it (absent: a VAE)."""
    return PixelSpaceConfig if fields.get("kind") == "pixels" else VAEConfig


def abstract_params(cfg: FirstStageConfig, batch: int = 1):
    """The first stage's boxed parameter tree as `ShapeDtypeStruct`s (`{}` for pixel space)."""
    return {} if isinstance(cfg, PixelSpaceConfig) else vae.abstract_params(cfg, batch)
