"""The demo: a small SDXL-family text-to-image model trained on procedural shapes, on a CPU, in minutes.

    python train.py --config configs/demo.py --workdir runs/demo      # writes runs/demo_shapes/ first
    python sample.py --config configs/demo.py --prompt "a green triangle on a white background"
    python sample.py --config configs/demo.py --config.sample.checkpoint=runs/demo/export/sdxl_jax \
        --prompt "a red circle on a black background"                   # your own run instead of the shipped one

The same networks as SDXL base, scaled down: a UNet with cross-attention to both text encoders' hidden
states and the vector conditioning (pooled text + the six size/crop micro-conditioning scalars), and two
small CLIP text encoders behind the real tokenizer (randomly initialised, trained along with the UNet).
Instead of a VAE it works in pixel space with 2x2 patches (`models.pixel_space`): nothing to train
first, and a 32x32 image is a 16x16x12 "latent". The UNet predicts the clean image (x0, "sample"):
an eps or v network this narrow leaves visible noise in every image, because it cannot reproduce the
noise exactly. Zero terminal SNR, so sampling starts from pure noise as training did (at SDXL's last
noise level a small image's mean colour leaks through, and colours come out at random). The x0 error is
weighted by min(SNR + 1, 5) (`min_snr_v`: unlike min-SNR's x0 form it still trains the pure-noise
step) and training timesteps are shifted toward high noise (3, as SD3 does for larger images): with
both, and a stochastic sampler (DPM++ 2M SDE, 40 steps), shapes came out right about twice as often.
The UNet's kernels train with Muon (`optimizer.name`): at the same number of steps it drew the right
shape for 76% of held-out prompts where AdamW got 58%, so 2200 of its dearer steps replace 2600 of
AdamW's. Data: `data.shapes`, 4000 captioned images of many sizes and aspect ratios, read by the grain
folder loader into three 32²-area buckets with random crops. What it learns: README, "The demo".
`malloc_huge_pages` restarts train.py once with glibc's malloc on transparent huge pages
(`sdxl_jax/train/huge_pages.py`): faster steps on a CPU (README, "Hardware notes").

`get_config()` is a training config (train.py) with a `sample` section that sample.py reads: it
points at the checkpoint shipped in `sdxl_jax/assets/demo` (the export of this config's run, in fp16).
"""

from pathlib import Path

import ml_collections

from sdxl_jax.data import shapes
from sdxl_jax.data.loader import default_data_config
from sdxl_jax.models import CLIPTextConfig, UNetConfig
from sdxl_jax.models.pixel_space import PixelSpaceConfig
from sdxl_jax.sampling import SamplingOptions, sample_config
from sdxl_jax.train.config import skeleton
from sdxl_jax.train.state import BASE_TIME_IDS, Models

SHIPPED = Path(__file__).resolve().parent.parent / "sdxl_jax" / "assets" / "demo"
WIDTH_L, WIDTH_G, POOLED, TIME_ID_DIM = 32, 32, 32, 8


def demo_models() -> Models:
    clip = dict(vocab_size=49408, max_position_embeddings=77, intermediate_size=64, num_layers=2, num_heads=2)
    text_l = CLIPTextConfig.tiny(hidden_size=WIDTH_L, **clip)
    text_g = CLIPTextConfig.tiny(hidden_size=WIDTH_G, activation="gelu", projection_dim=POOLED, **clip)
    pixels = PixelSpaceConfig(patch_size=2)
    unet = UNetConfig.tiny(
        in_channels=pixels.latent_channels, out_channels=pixels.latent_channels, model_channels=32,
        channel_mult=(1, 2, 4), transformer_depth=(0, 1, 1), transformer_depth_middle=1, num_res_blocks=1,
        head_dim=32, context_dim=WIDTH_L + WIDTH_G, adm_in_channels=POOLED + BASE_TIME_IDS * TIME_ID_DIM,
        time_id_embed_dim=TIME_ID_DIM,
    )  # fmt: skip
    return Models("base", unet, pixels, text_l, text_g)


# How the demo model samples: 32x32, DPM++ 2M SDE over 40 trailing steps, CFG 4 (sample.py and validation).
OPTIONS = SamplingOptions(
    height=32, width=32, steps=40, sampler="dpmpp_2m_sde", schedule="trailing", guidance_scale=4.0
)


def sampling() -> ml_collections.ConfigDict:
    """What sample.py reads (the fields of configs/sdxl_base.py), for the demo model: the shipped
    checkpoint in fp32, sampled with `OPTIONS`."""
    return sample_config(OPTIONS, checkpoint=str(SHIPPED), dtype="fp32")


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/demo.py takes no argument, got {arg!r}")
    models = demo_models()
    data = default_data_config()
    data.update(
        source="shapes", path="runs/demo_shapes", buckets="area=32,step=8,ratio=2.0", num_workers=0, caption_dropout=0.1
    )
    with data.unlocked():
        data.num_images, data.shapes_seed = 4000, 0
        data.shapes, data.foregrounds = ",".join(shapes.SHAPES), ",".join(shapes.FOREGROUNDS)
    c = skeleton(models, data)
    c.num_steps = 2200
    c.batch_size = 32  # more, smaller steps learned more in the same 15 minutes than 1300 x 64
    c.log_every = 100
    c.checkpoint_every = 1000
    c.mesh.update(data=-1, fsdp=1)
    # Muon for the UNet's kernels: a step costs a third more here, but it learns shapes in far fewer steps
    c.optimizer.update(
        name="muon",
        learning_rate=1e-3,
        schedule="cosine",
        warmup_steps=100,
        decay_steps=2200,
        end_factor=0.05,
        weight_decay=0.0,
    )
    c.ema.decay = 0.999
    c.diffusion.update(
        prediction="sample", zero_terminal_snr=True, weighting="min_snr_v", min_snr_gamma=5.0, timestep_shift=3.0
    )
    c.validation.update(
        every=2200, prompts=("a green triangle on a white background", "a red circle on a blue background")
    )
    c.validation.update({k: v for k, v in OPTIONS.config_fields().items() if k in c.validation})
    c.train_text_encoders = True  # the words' embeddings learn too (cheap; faster than reading frozen random ones)
    c.optimizer.text_encoder_learning_rate = 1e-3
    c.export_on_finish = "project"
    c.peak_flops_per_device = 1e12  # nominal, for a CPU
    c.malloc_huge_pages = True  # XLA:CPU's step buffers on huge pages (README, "Hardware notes")
    c.sample = sampling()
    return c
