"""Test data for the input pipeline, generated on the fly: images of exact sizes and modes, a corpus of
bad inputs, WebDataset tars, a TFDS dataset (written without TensorFlow), a small bucket table."""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# A small multi-aspect table (sides step 32, area <= 128²) so tests move kilobytes, not megabytes.
SMALL_BUCKETS = "area=128,step=32"


def coordinate_image(h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3]: R encodes the row, G the column (scaled to 0..255), B constant: crops are readable."""
    rows = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    cols = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    return np.stack([rows, cols, np.full((h, w), 128.0)], -1).round().astype(np.uint8)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def jpeg(h: int, w: int, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    base = coordinate_image(h, w).astype(np.int16) + rng.integers(-20, 20, (1, 1, 3))
    return encode(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), "JPEG", quality=quality)


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    """A JPEG whose EXIF says `orientation` (6: displayed rotated 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h (8-bit grey) with a tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def write_folder(root: Path, items: dict[str, tuple[bytes, bytes | str | None]]) -> Path:
    """name -> (image bytes, caption (bytes/str) or None): writes name and its `.txt` sidecar."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, caption) in items.items():
        (root / name).write_bytes(data)
        if caption is not None:
            txt = root / (Path(name).stem + ".txt")
            txt.write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    return root


def mixed_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    """n JPEGs cycling through 4 aspect ratios (landscape 3:2, portrait 2:3, square, wide 3:1), captioned."""
    shapes = [(60, 90), (90, 60), (70, 70), (40, 120)]
    items = {
        f"img{i:03d}.jpg": (jpeg(*shapes[i % 4], seed=seed + i), f"photo number {i}, tag a, tag b") for i in range(n)
    }
    return write_folder(root, items)


def bad_corpus(root: Path) -> dict[str, str]:
    """The issue's corpus of bad inputs plus good controls; returns name -> expected outcome:
    a skip reason, "kept" or "kept:<repair note>"."""
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :48, 3] = 255  # left half opaque red, right half transparent (-> white)
    palette = Image.new("P", (80, 64), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 40, 64))
    cmyk = Image.new("CMYK", (96, 64), (0, 255, 255, 0))  # red in CMYK
    grey16 = Image.fromarray(coordinate_image(64, 80)[..., 0].astype(np.uint16) * 257)  # 16-bit grey
    good = jpeg(60, 90, seed=1)
    items = {
        "good_a.jpg": (jpeg(60, 90, seed=2), "a good photo"),
        "good_b.png": (encode(Image.fromarray(coordinate_image(90, 60)), "PNG"), "a good drawing"),
        "truncated.jpg": (good[: len(good) // 2], "cut in half"),
        "zero.jpg": (b"", "empty file"),
        "text.png": (b"this is not an image at all, just text\n" * 10, "a text file"),
        "tiny.png": (encode(Image.new("RGB", (1, 1), (0, 255, 0)), "PNG"), "one pixel"),
        "bomb.png": (png_header_only(20000, 20000), "a bomb"),
        "cmyk.jpg": (encode(cmyk, "JPEG", quality=95), "cmyk red"),
        "grey16.png": (encode(grey16, "PNG"), "sixteen bits"),
        "palette.png": (encode(palette, "PNG", transparency=1), "palette with transparency"),
        "rgba.png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), "half transparent"),
        "rotated.jpg": (with_orientation(Image.fromarray(coordinate_image(60, 90)), 6), "exif rotated"),
        "no_caption.jpg": (jpeg(70, 70, seed=3), None),
        "latin1.jpg": (jpeg(70, 70, seed=4), "caf\xe9 cr\xe8me".encode("cp1252")),
        "empty_caption.jpg": (jpeg(70, 70, seed=5), "   \n"),
        "long_caption.jpg": (jpeg(70, 70, seed=6), " ".join(["word"] * 500)),
    }
    write_folder(root, items)
    return {
        "good_a.jpg": "kept", "good_b.png": "kept", "truncated.jpg": "decode_error", "zero.jpg": "empty_file",
        "text.png": "not_an_image", "tiny.png": "kept", "bomb.png": "too_large", "cmyk.jpg": "kept",
        "grey16.png": "kept", "palette.png": "kept", "rgba.png": "kept", "rotated.jpg": "kept",
        "no_caption.jpg": "kept:no_caption_uncond", "latin1.jpg": "kept:caption_not_utf8",
        "empty_caption.jpg": "kept:no_caption_uncond", "long_caption.jpg": "kept:caption_truncated",
    }  # fmt: skip


def write_tar(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    """An uncompressed tar with the given members (in order), plus optional symlink members."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def webdataset_shards(root: Path, n_shards: int = 2, per_shard: int = 4) -> Path:
    """img2dataset-style shards: `{key}.jpg`, `{key}.txt`, `{key}.json` (with an aesthetic score)."""
    root.mkdir(parents=True, exist_ok=True)
    shapes = [(60, 90), (90, 60), (70, 70), (40, 120)]
    for s in range(n_shards):
        members = {}
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            members[f"{key}.jpg"] = jpeg(*shapes[i % 4], seed=s * 100 + i)
            members[f"{key}.txt"] = f"tar caption {s} {i}".encode()
            members[f"{key}.json"] = json.dumps({"key": key, "aesthetic_score": 5.0 + i}).encode()
        write_tar(root / f"{s:05d}.tar", members)
    return root


_TFDS_BUILDER = None


def _tfds_builder_class():
    """The test TFDS builder, defined once: TFDS registers builder classes by name at definition."""
    global _TFDS_BUILDER
    if _TFDS_BUILDER is None:
        import tensorflow_datasets as tfds

        class TinyCaptionSet(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            n = 6
            shapes = [(60, 90), (90, 60), (70, 70)]

            def _info(self):
                features = {"image": tfds.features.Image(encoding_format="jpeg"), "caption": tfds.features.Text()}
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(self.n):
                    yield i, {"image": io.BytesIO(jpeg(*self.shapes[i % 3], seed=i)), "caption": f"tfds caption {i}"}

        # TFDS finds a builder's code through its module, and for a module inside a package (this one is
        # `tests.helpers.data_fixtures`) it needs `importlib_resources`, which it does not install. A
        # module name it cannot resolve leaves the builder without a code path, which it does not need.
        TinyCaptionSet.__module__ = "tiny_caption_set"
        _TFDS_BUILDER = TinyCaptionSet
    return _TFDS_BUILDER


def tfds_dataset(data_dir: Path, n: int = 6) -> Path:
    """A TFDS dataset (ArrayRecord files) with `image` and `caption` features, built without TensorFlow.
    Returns the dataset folder (`.../tiny_caption_set/1.0.0`) for `tfds.builder_from_directory`."""
    cls = _tfds_builder_class()
    cls.n = n
    builder = cls(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)
