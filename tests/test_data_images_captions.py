"""Decoding every image mode to RGB uint8 (EXIF, alpha on white, CMYK, 16-bit, bombs) and caption handling."""

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data.captions import parse_captions, pick_caption, shuffle_tags
from sdxl_jax.data.images import BadImage, decode_image, decode_rgb, image_size
from tests.helpers.data_fixtures import coordinate_image, encode, jpeg, png_header_only, with_orientation


def test_rgb_jpeg_and_header_size_from_bytes_and_path(tmp_path):
    data = jpeg(60, 90)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert image_size(data) == image_size(str(path)) == (60, 90)
    pixels = decode_rgb(str(path))
    assert pixels.shape == (60, 90, 3) and pixels.dtype == np.uint8


def test_exif_orientation_rotates_size_and_pixels():
    stored = coordinate_image(60, 90)  # R = row, G = column
    data = with_orientation(Image.fromarray(stored), 6)  # displayed rotated 90° clockwise
    assert image_size(data) == (90, 60)
    shown = decode_rgb(data).astype(int)
    expected = np.rot90(stored, k=-1).astype(int)
    assert shown.shape == (90, 60, 3) and np.abs(shown - expected).mean() < 3


@pytest.mark.parametrize("make,top_left,bottom_right", [
    (lambda: Image.new("L", (8, 6), 77), [77, 77, 77], [77, 77, 77]),
    (lambda: Image.new("LA", (8, 6), (77, 0)), [255, 255, 255], [255, 255, 255]),  # transparent -> white
    (lambda: Image.new("RGBA", (8, 6), (255, 0, 0, 255)), [255, 0, 0], [255, 0, 0]),
    (lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), [255, 0, 0], [255, 0, 0]),
    (lambda: Image.new("1", (8, 6), 1), [255, 255, 255], [255, 255, 255]),
    (lambda: Image.fromarray(np.full((6, 8), 65535, np.uint16)), [255, 255, 255], [255, 255, 255]),  # 16-bit grey
    (lambda: Image.fromarray(np.full((6, 8), 0.5, np.float32)), [128, 128, 128], [128, 128, 128]),
])  # fmt: skip
def test_modes_become_rgb_uint8(make, top_left, bottom_right):
    img = make()
    fmt = "TIFF" if img.mode in ("CMYK", "F") else "PNG"
    pixels = decode_rgb(encode(img, fmt))
    assert pixels.shape == (6, 8, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0].tolist() == top_left and pixels[-1, -1].tolist() == bottom_right


def test_palette_with_transparency_and_half_alpha_composite_on_white():
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 2, 2))
    pixels = decode_rgb(encode(pal, "PNG", transparency=1))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 3].tolist() == [255, 0, 0]
    half = decode_rgb(encode(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "PNG"))
    assert abs(int(half[0, 0, 0]) - 127) <= 1  # black at 50% over white


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"just some text, not a picture\n" * 4, "not_an_image"),
    (png_header_only(20000, 20000), "too_large"),
])  # fmt: skip
def test_bad_headers_raise_with_a_reason(data, reason):
    with pytest.raises(BadImage) as e:
        image_size(data)
    assert e.value.reason == reason


def test_truncated_jpeg_passes_the_header_but_fails_to_decode():
    data = jpeg(200, 300)
    assert image_size(data[: len(data) // 2]) == (200, 300)
    with pytest.raises(BadImage) as e:
        decode_rgb(data[: len(data) // 2])
    assert e.value.reason == "decode_error"


def test_bomb_guard_is_configurable():
    data = png_header_only(3000, 3000)
    with pytest.raises(BadImage, match="too_large"):
        image_size(data, max_pixels=4_000_000)
    assert image_size(data, max_pixels=10_000_000) == (3000, 3000)


def test_jpeg_draft_decodes_at_a_reduced_scale_that_still_covers():
    data = jpeg(800, 1200)
    img = decode_image(data, draft=(200, 300))
    assert (img.height, img.width) == (200, 300)  # 1/4 scale
    img = decode_image(data, draft=(250, 300))
    assert (img.height, img.width) == (400, 600)  # 1/4 would not cover 250: 1/2


# ---- captions -------------------------------------------------------------------------------------


def test_parse_captions_lines_lists_and_encodings():
    assert parse_captions(b"a cat\n\n  a   dog \r\n") == (["a cat", "a dog"], [])
    assert parse_captions(["one", b"two"]) == (["one", "two"], [])
    assert parse_captions("caf\xe9".encode("cp1252")) == (["café"], ["caption_not_utf8"])
    assert parse_captions("\ufeffbom".encode("utf-8")) == (["bom"], [])
    assert parse_captions(b"  \n ") == ([], [])
    assert parse_captions(None) == ([], [])


def test_shuffle_tags_keeps_the_first_n_and_permutes_the_rest():
    text = "sks person, red hat, smiling, outdoors, winter"
    seen = set()
    for seed in range(30):
        out = shuffle_tags(text, np.random.default_rng(seed), keep_first=1)
        tags = out.split(", ")
        assert tags[0] == "sks person" and sorted(tags[1:]) == sorted(["red hat", "smiling", "outdoors", "winter"])
        seen.add(out)
    assert len(seen) > 10


def test_pick_caption_choice_dropout_and_determinism():
    caps = ["first", "second", "third"]
    picks = [pick_caption(caps, np.random.default_rng(s), 0.0, False, 0) for s in range(300)]
    assert {p for p, _ in picks} == set(caps) and not any(d for _, d in picks)
    assert pick_caption(caps, np.random.default_rng(5), 0.2, False, 0) == pick_caption(
        caps, np.random.default_rng(5), 0.2, False, 0
    )
    drops = [pick_caption(caps, np.random.default_rng(s), 0.25, False, 0) for s in range(2000)]
    rate = np.mean([d for _, d in drops])
    assert 0.21 < rate < 0.29
    assert all(t == "" for t, d in drops if d)
    assert pick_caption([], np.random.default_rng(0), 0.0, False, 0) == ("", True)
