"""The tiny SDXL-shaped UNet used by tests.  python sample.py --preset tiny"""

import dataclasses

import ml_collections

from sdxl_jax.models import UNetConfig


def get_config(arg=None):
    return ml_collections.ConfigDict({"unet": dataclasses.asdict(UNetConfig.tiny())})
