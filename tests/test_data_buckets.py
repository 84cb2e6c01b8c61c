"""Bucket tables, nearest-aspect assignment, cover resize, crops and flips (synthetic images of exact sizes)."""

import math

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data.buckets import (
    SDXL_BUCKETS,
    Bucket,
    assign_bucket,
    assign_buckets,
    bucket_table,
    config_buckets,
    cover_size,
    crop_offset,
    flipped_offset,
    generate_buckets,
    largest_bucket,
)  # fmt: skip
from sdxl_jax.data.transforms import crop_to_bucket
from tests.helpers.data_fixtures import coordinate_image


def test_sdxl_table_is_the_26_published_sizes():
    assert len(SDXL_BUCKETS) == 26
    names = {b.name for b in SDXL_BUCKETS}
    assert {"1024x1024", "704x1408", "1728x576", "1216x832", "832x1216"} <= names
    assert all(b.h % 64 == 0 and b.w % 64 == 0 for b in SDXL_BUCKETS)
    assert all(0.9 * 1024**2 <= b.h * b.w <= 1024**2 for b in SDXL_BUCKETS)
    ratios = [b.h / b.w for b in SDXL_BUCKETS]
    assert ratios == sorted(ratios, reverse=True)  # tallest first
    assert bucket_table("sdxl") is SDXL_BUCKETS


@pytest.mark.parametrize("area,step", [(256, 64), (512, 64), (1024, 64), (128, 32)])
def test_generated_tables_respect_area_step_and_ratio(area, step):
    table = bucket_table(f"area={area},step={step}")
    assert Bucket(area, area) in table  # the square
    for b in table:
        assert b.h % step == 0 and b.w % step == 0
        assert b.h * b.w <= area * area
        assert max(b.h, b.w) / min(b.h, b.w) <= 4
        assert Bucket(b.w, b.h) in table  # symmetric
        # widest for its height (or the transpose of such a size): one more step exceeds the area or max side
        assert any(y * (x + step) > area * area or x + step > 2 * area for y, x in (b, b[::-1]))


def test_generator_bounds_and_errors():
    table = generate_buckets(512 * 512, 64, min_side=384, max_side=768, max_ratio=2.0)
    assert min(min(b) for b in table) >= 384 and max(max(b) for b in table) <= 768
    assert all(max(b) / min(b) <= 2.0 for b in table)
    assert {b.name for b in table} == {"512x512", "448x576", "576x448", "384x640", "640x384"}
    with pytest.raises(ValueError, match="bucket spec"):
        bucket_table("area512")
    with pytest.raises(ValueError, match="no bucket fits"):
        generate_buckets(64 * 64, 64, min_side=128, max_side=256)


def test_listed_tables_are_exactly_the_sizes_named():
    table = bucket_table("24x24, 32x24,24x32")
    assert table == (Bucket(32, 24), Bucket(24, 24), Bucket(24, 32))  # WxH, sorted tallest first
    assert [b.name for b in table] == ["24x32", "24x24", "32x24"]
    assert bucket_table("area=32,step=8,min=24,max=40") == bucket_table("24x40,32x32,40x24")  # "max" has an x
    for bad in ("24x24,24x24", "24x0", "24x24,x32", "24x2.5", "area512"):
        with pytest.raises(ValueError, match="bucket spec"):
            bucket_table(bad)


def test_config_buckets_and_the_largest_one():
    assert config_buckets(((32, 32), (32, 48))) == (Bucket(32, 32), Bucket(32, 48))  # the synthetic source's pairs
    assert config_buckets("sdxl") == SDXL_BUCKETS
    assert largest_bucket(SDXL_BUCKETS) == Bucket(1024, 1024)
    assert largest_bucket(config_buckets(((32, 32), (32, 48)))) == Bucket(32, 48)
    assert largest_bucket(bucket_table("area=256")) == Bucket(256, 256)  # squarest of equal areas (128x512 too)


@pytest.mark.parametrize("hw,expected", [
    ((1080, 1920), "1344x768"),   # 16:9 landscape
    ((1920, 1080), "768x1344"),   # 9:16 portrait
    ((1000, 1000), "1024x1024"),
    ((3000, 4000), "1152x896"),   # 3:4 landscape (w=4000)
    ((100, 10000), "1728x576"),   # extreme: the widest bucket
    ((1, 1), "1024x1024"),
])  # fmt: skip
def test_assignment_is_nearest_in_log_aspect(hw, expected):
    k = assign_bucket(*hw, SDXL_BUCKETS)
    assert SDXL_BUCKETS[k].name == expected
    dist = [abs(math.log(hw[0] / hw[1]) - math.log(b.h / b.w)) for b in SDXL_BUCKETS]
    assert dist[k] == min(dist)


def test_assignment_is_vectorised_and_symmetric_for_a_symmetric_table():
    table = bucket_table("area=1024")  # (SDXL's own table has wider landscape than portrait sizes)
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 5000, (200, 2))
    sizes[0] = 700  # a square: its own transpose
    ks, ks_t = assign_buckets(sizes, table), assign_buckets(sizes[:, ::-1], table)
    assert [assign_bucket(*s, table) for s in sizes] == ks.tolist()
    for k, kt, (h, w) in zip(ks, ks_t, sizes):
        if h != w:
            assert table[k] == Bucket(table[kt].w, table[kt].h)


@pytest.mark.parametrize("hw,bucket,cover", [
    ((1080, 1920), Bucket(768, 1344), (768, 1365)),
    ((3000, 2000), Bucket(1216, 832), (1248, 832)),
    ((1, 1), Bucket(1024, 1024), (1024, 1024)),   # upscaled
    ((640, 448), Bucket(640, 448), (640, 448)),   # exact fit: unchanged
])  # fmt: skip
def test_cover_size(hw, bucket, cover):
    assert cover_size(*hw, bucket) == cover
    assert cover_size(*cover, bucket) == cover  # a cover-sized image is its own cover (prepared shards)


def test_crop_offsets_random_centre_and_flipped():
    b = Bucket(768, 1344)
    assert crop_offset((768, 1365), b, None) == (0, 10)
    rng = np.random.default_rng(0)
    offsets = {crop_offset((768, 1365), b, rng) for _ in range(300)}
    assert {o[0] for o in offsets} == {0} and {o[1] for o in offsets} == set(range(22))
    assert flipped_offset(1365, b, 0) == 21 and flipped_offset(1365, b, 21) == 0
    with pytest.raises(ValueError, match="does not cover"):
        crop_offset((700, 1365), b, None)


def test_crop_pixels_match_resize_then_crop_and_report_micro_conditioning():
    h, w, bucket = 300, 500, Bucket(128, 192)
    src = Image.fromarray(coordinate_image(h, w))
    cover = cover_size(h, w, bucket)
    reference = np.asarray(src.resize((cover[1], cover[0]), Image.Resampling.LANCZOS), np.int16)
    for seed in range(5):
        crop = crop_to_bucket(src, (h, w), bucket, np.random.default_rng(seed), random_crop=True)
        top, left = crop.crop_top_left
        assert crop.pixels.shape == (128, 192, 3) and crop.pixels.dtype == np.uint8
        assert crop.original_size == (h, w) and crop.target_size == (128, 192)
        expected = reference[top : top + 128, left : left + 192]
        assert np.abs(crop.pixels.astype(np.int16) - expected)[2:-2, 2:-2].max() <= 2  # edges filter differently


def test_flip_mirrors_pixels_and_offset():
    h, w, bucket = 100, 400, Bucket(64, 160)
    src = Image.fromarray(coordinate_image(h, w))
    plain = crop_to_bucket(src, (h, w), bucket, np.random.default_rng(3), flip_prob=0.0)
    flipped = crop_to_bucket(src, (h, w), bucket, np.random.default_rng(3), flip_prob=1.0)
    np.testing.assert_array_equal(flipped.pixels, plain.pixels[:, ::-1])
    cover_w = cover_size(h, w, bucket)[1]
    assert flipped.crop_top_left == (plain.crop_top_left[0], cover_w - bucket.w - plain.crop_top_left[1])
    # the flipped crop is the crop of the flipped cover image at the reported offset
    cover = np.asarray(src.resize((cover_w, bucket.h), Image.Resampling.LANCZOS))[:, ::-1]
    top, left = flipped.crop_top_left
    assert np.abs(cover[top : top + 64, left : left + 160].astype(int) - flipped.pixels)[:, 2:-2].max() <= 2


def test_small_images_are_upscaled_with_true_original_size():
    crop = crop_to_bucket(Image.new("RGB", (3, 2), (10, 200, 30)), (2, 3), Bucket(96, 160), np.random.default_rng(0))
    assert crop.pixels.shape == (96, 160, 3) and crop.original_size == (2, 3)
    assert (crop.pixels == [10, 200, 30]).all()
