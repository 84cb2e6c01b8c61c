"""How close a reconstruction is to its image: PSNR and SSIM, per image, in JAX (jit-able, any device).

    psnr(images, reconstructions)   # [B] dB
    ssim(images, reconstructions)   # [B] in [-1, 1]

Both take `[B, H, W, C]` images of one shape, uint8 or float, on the same scale: `data_range` is the
distance from the darkest to the brightest possible value (255 for uint8, 2 for [-1, 1]). Computed in
fp32 (float64 is not enabled in JAX).

PSNR = 10 log10(data_range² / MSE), the MSE over every pixel and channel of the image (scikit-image's
`peak_signal_noise_ratio`); an exact copy gives +inf.

SSIM is Wang et al.'s (2004): a Gaussian window (sigma 1.5, 11 taps: truncated at 3.5 sigma, as
scikit-image's `gaussian_weights=True` builds it), K1 0.01, K2 0.03, population (not sample)
covariances, the SSIM map averaged over the pixels whose window lies wholly inside the image (those
5 pixels or more from every edge; scikit-image crops the same border) and over channels. It equals
`skimage.metrics.structural_similarity(x, y, data_range=..., channel_axis=-1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`. Images need at least 11 rows and columns.
"""

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def _pair(x, y) -> tuple[jax.Array, jax.Array]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"images and reconstructions must be [B, H, W, C] of one shape, got {x.shape} and {y.shape}")
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def psnr(images, reconstructions, data_range: float = 255.0) -> jax.Array:
    """Peak signal-to-noise ratio of each image, fp32 `[B]` in dB."""
    x, y = _pair(images, reconstructions)
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """The normalised 1-D Gaussian taps, radius `int(truncate * sigma + 0.5)` (scipy's): 11 for SSIM."""
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(x: jax.Array, taps: jax.Array) -> jax.Array:
    """The separable Gaussian of `[N, H, W, C]` over H and W, 'valid' only: `[N, H - 2r, W - 2r, C]`."""
    n = taps.shape[0]
    c = x.shape[-1]
    rows = jnp.tile(taps.reshape(n, 1, 1, 1), (1, 1, 1, c))  # depthwise [kh, kw, 1, C]
    cols = jnp.tile(taps.reshape(1, n, 1, 1), (1, 1, 1, c))
    conv = lambda v, k: jax.lax.conv_general_dilated(
        v, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    return conv(conv(x, rows), cols)


def ssim(images, reconstructions, data_range: float = 255.0) -> jax.Array:
    """Mean structural similarity of each image, fp32 `[B]` (see the module docstring)."""
    x, y = _pair(images, reconstructions)
    taps = jnp.asarray(gaussian_window())
    if min(x.shape[1:3]) < taps.shape[0]:
        size = f"{x.shape[1]}x{x.shape[2]}"
        raise ValueError(f"SSIM needs images of at least {taps.shape[0]}x{taps.shape[0]}, got {size}")
    # every moment in one blur: x, y, x², y², xy stacked along the batch
    moments = _blur(jnp.concatenate([x, y, x * x, y * y, x * y]), taps)
    mx, my, xx, yy, xy = jnp.split(moments, 5)
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))
