"""End to end on real photos (scikit-image's sample data): SDXL bucket per photo, and for every example
the pixels equal the cover-resized photo cropped at the reported `crop_top_left` (flipped or not)."""

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data import default_data_config, make_loader
from sdxl_jax.data.buckets import Bucket, cover_size
from sdxl_jax.data.sources import FolderSource
from tests.helpers.data_fixtures import encode, with_orientation

skimage_data = pytest.importorskip("skimage.data")

# name -> (displayed (h, w), SDXL bucket "WxH"), buckets worked out by hand from log aspect ratios
EXPECTED = {
    "astronaut.jpg": ((512, 512), "1024x1024"),
    "chelsea.jpg": ((300, 451), "1216x832"),
    "coffee.jpg": ((400, 600), "1216x832"),
    "hubble.jpg": ((872, 1000), "1088x960"),
    "retina_strip.jpg": ((1411, 700), "704x1408"),
    "rocket_exif_portrait.jpg": ((640, 427), "832x1216"),
    "text.png": ((172, 448), "1600x640"),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    d = skimage_data
    files = {
        "astronaut.jpg": encode(Image.fromarray(d.astronaut()), "JPEG", quality=95),
        "chelsea.jpg": encode(Image.fromarray(d.chelsea()), "JPEG", quality=95),
        "coffee.jpg": encode(Image.fromarray(d.coffee()), "JPEG", quality=95),
        "hubble.jpg": encode(Image.fromarray(d.hubble_deep_field()), "JPEG", quality=95),
        "retina_strip.jpg": encode(Image.fromarray(d.retina()[:, :700]), "JPEG", quality=95),
        # stored landscape 427x640, EXIF says rotate: displayed portrait 640x427
        "rocket_exif_portrait.jpg": with_orientation(Image.fromarray(d.rocket()), 6),
        "text.png": encode(Image.fromarray(d.text()), "PNG"),  # greyscale
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"a photo: {name.split('.')[0]}")
    return root


def displayed(path) -> np.ndarray:
    from PIL import ImageOps

    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def test_real_photos_buckets_crops_and_micro_conditioning(photos):
    c = default_data_config()
    c.update(dict(path=str(photos), num_workers=0, record_ids=True, flip_prob=0.5, caption_dropout=0.0, num_epochs=2))
    keys = FolderSource(photos).paths
    flips = 0
    for batch in make_loader(c, seed=0, global_batch_size=1, process_index=0, process_count=1):
        name = keys[int(batch["record_id"][0])]
        (h, w), bucket = EXPECTED[name]
        th, tw = batch["target_size"][0]
        assert batch["original_size"][0].tolist() == [h, w], name
        assert f"{tw}x{th}" == bucket, name
        assert batch["images"].shape == (1, th, tw, 3)
        ch, cw = cover_size(h, w, Bucket(int(th), int(tw)))
        top, left = batch["crop_top_left"][0]
        assert 0 <= top <= ch - th and 0 <= left <= cw - tw
        cover = np.asarray(
            Image.fromarray(displayed(photos / name)).resize((cw, ch), Image.Resampling.LANCZOS), np.int16
        )
        got = batch["images"][0].astype(np.int16)
        plain = np.abs(cover[top : top + th, left : left + tw] - got)[4:-4, 4:-4].mean()
        mirrored = np.abs(cover[:, ::-1][top : top + th, left : left + tw] - got)[4:-4, 4:-4].mean()
        assert min(plain, mirrored) < 2.0, (name, plain, mirrored)
        assert max(plain, mirrored) > 4 * min(plain, mirrored) + 1, (
            name,
            plain,
            mirrored,
        )  # real content tells them apart
        flips += mirrored < plain
    assert 0 < flips < 14
