"""Stable Diffusion XL in JAX/Flax: models, samplers, the trainer, checkpoint conversion.

The package, by the path of the data: `tokenizer` and `conditioning` (text -> context and vector y),
`models/` (UNet, CLIP, VAE), `diffusion/` (schedules, denoisers, guidance, samplers, losses as pure
functions), `sampling` (`SamplingOptions`: one generation call's options), `generation` (the one compiled
sampling program) and `pipeline` (load, place, generate);
`sharding` (meshes, logical axes, shardings); `data/` (sources, buckets, the grain loader) and `train/`
(the trainer); `convert/` (PyTorch checkpoints in and out).
"""

__version__ = "0.1.0"
