"""LPIPS (VGG variant): the perceptual distance CompVis' first-stage losses add to the reconstruction loss.

The `lpips` package's `LPIPS(net="vgg")` (and taming's stripped copy, which ldm's
`LPIPSWithDiscriminator` uses), in NHWC:

  x, y in [-1, 1] -> (x - SHIFT) / SCALE                  (lpips' ScalingLayer)
  -> torchvision VGG16 `features`, read after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  -> per stage: unit-normalise each pixel's feature vector over channels, f / (|f| + 1e-10),
     square the difference, a learned 1x1 conv to one channel without bias (`lin0..lin4`),
     mean over pixels
  -> sum over stages: the distance `[B]` (lpips returns it as `[B, 1, 1, 1]`).

The heads' dropout is off at evaluation, which is how the losses use them. Everything is fp32 and
the parameters are frozen (never trained here); the tree mirrors the PyTorch names so the converter
(`sdxl_jax.convert.perceptual`) maps it key by key:
  vgg/features_{i}/{kernel, bias}   <- torchvision `features.{i}.{weight, bias}`
  lin{s}/kernel                      <- lpips `lin{s}.model.1.weight`
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.layers import conv, conv_kernel_init

# lpips' ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# The five stages LPIPS reads: name, width, and the torchvision `features` indices of its 3x3 convs
# (each followed by a ReLU at the next index). Every stage after the first starts with a 2x2 max pool;
# the pool after relu5_3 (index 30) and the classifier are not used.
STAGES = (
    ("relu1_2", 64, (0, 2)),
    ("relu2_2", 128, (5, 7)),
    ("relu3_3", 256, (10, 12, 14)),
    ("relu4_3", 512, (17, 19, 21)),
    ("relu5_3", 512, (24, 26, 28)),
)
VGG16_CONVS = tuple(i for _, _, indices in STAGES for i in indices)
MIN_SIZE = 2 ** (len(STAGES) - 1)  # relu5_3 is at 1/16 of the input's size
NORM_EPS = 1e-10


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def scale_inputs(x: jax.Array) -> jax.Array:
    """lpips' ScalingLayer on NHWC images in [-1, 1] (a division, as torch computes it)."""
    return (_f32(x) - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)


def unit_normalize(f: jax.Array) -> jax.Array:
    """f / (sqrt(sum over channels of f^2) + 1e-10), per pixel.

    The square root's gradient is taken as 0 where a pixel's features are all zero (its value there is
    0 either way): d sqrt(s)/ds is infinite at s = 0, and 0 * inf would make the loss's gradient NaN.
    """
    s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = s > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


class Vgg16Features(nn.Module):
    """torchvision's VGG16 `features` (3x3 convs with padding 1 and bias, ReLU, 2x2 max pools) up to
    relu5_3. `[B, H, W, 3]` (already scaled) -> the five stage outputs, fp32 `[B, H / 2^s, W / 2^s, C_s]`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        h, outs = _f32(x), []
        for s, (_, width, indices) in enumerate(STAGES):
            if s:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i in indices:
                h = nn.relu(conv(width, name=f"features_{i}", **kw)(h))
            outs.append(h)
        return tuple(outs)


def check_pair(x: jax.Array, y: jax.Array) -> None:
    """Loud errors for an LPIPS input pair that is not two `[B, H, W, 3]` of one shape, H, W >= 16."""
    if x.shape != y.shape:
        raise ValueError(f"LPIPS compares images of one shape, got {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS images must be [B, H, W, 3] (NHWC, RGB in [-1, 1]), got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"LPIPS images must be at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1]}x{x.shape[2]}")


class Lpips(nn.Module):
    """The LPIPS distance between two batches of images. Call through `apply`:

        d = Lpips().apply({"params": p}, x, y)                           # [B]
        d, terms = Lpips().apply({"params": p}, x, y, stages=True)       # terms: stage name -> [B]

    `p` comes from `sdxl_jax.convert.load_lpips` (torchvision's VGG16 and lpips' heads); `init` gives a
    random tree of the same structure.
    """

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, *, stages: bool = False):
        """x, y: `[B, H, W, 3]` in [-1, 1] -> fp32 distance `[B]` (and, with `stages`, the dict of the
        five per-stage terms, each `[B]`, whose sum it is)."""
        check_pair(x, y)
        n = x.shape[0]
        features = Vgg16Features(name="vgg")(jnp.concatenate([scale_inputs(x), scale_inputs(y)]))
        terms = {}
        for s, ((name, _, _), f) in enumerate(zip(STAGES, features)):
            diff = jnp.square(unit_normalize(f[:n]) - unit_normalize(f[n:]))
            head = nn.Conv(
                1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                kernel_init=conv_kernel_init(), name=f"lin{s}",
            )  # fmt: skip
            terms[name] = head(diff).mean(axis=(1, 2, 3))
        distance = sum(terms.values())
        return (distance, terms) if stages else distance


@functools.cache
def abstract_params():
    """The boxed (logically annotated) parameter tree as `ShapeDtypeStruct`s; nothing is allocated. Cached:
    read-only."""
    x = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3))
    return jax.eval_shape(lambda: Lpips().init(jax.random.key(0), x, x)["params"])
