"""Sources: image folders (sidecars, metadata.jsonl), WebDataset tars read in memory, TFDS without TensorFlow."""

import json
import os

import numpy as np
import pytest

from sdxl_jax.data.buckets import bucket_table
from sdxl_jax.data.images import decode_rgb, image_size
from sdxl_jax.data.index import ScanFilters, scan_source
from sdxl_jax.data.sources import FolderSource, TarSource, TfdsSource, tar_shards
from tests.helpers.data_fixtures import SMALL_BUCKETS, jpeg, tfds_dataset, webdataset_shards, write_folder, write_tar


def test_folder_with_sidecars_json_and_subfolders(tmp_path):
    write_folder(tmp_path, {"b.jpg": (jpeg(60, 90), "first caption\nsecond caption"), "a.png": (jpeg(40, 40), None)})
    (tmp_path / "a.json").write_text(json.dumps({"aesthetic_score": 7.5}))
    write_folder(tmp_path / "sub", {"c.jpeg": (jpeg(50, 50), "in a subfolder")})
    (tmp_path / "notes.md").write_text("not an image")
    src = FolderSource(tmp_path)
    assert [src[i].key for i in range(len(src))] == ["a.png", "b.jpg", os.path.join("sub", "c.jpeg")]
    a, b, c = (src[i] for i in range(3))
    assert a.captions == [] and a.aesthetic == 7.5
    assert b.captions == ["first caption", "second caption"] and b.aesthetic is None
    assert c.captions == ["in a subfolder"] and image_size(c.image) == (50, 50)


def test_folder_with_huggingface_metadata_jsonl(tmp_path):
    write_folder(tmp_path / "train", {"x.jpg": (jpeg(60, 90), "sidecar loses"), "y.jpg": (jpeg(90, 60), None)})
    lines = [
        {"file_name": "x.jpg", "text": "from metadata", "aesthetic": 5.5},
        {"file_name": "y.jpg", "text": ["one", "two"]},
    ]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = FolderSource(tmp_path)
    x, y = src[0], src[1]
    assert x.captions == ["from metadata"] and x.aesthetic == 5.5
    assert y.captions == ["one", "two"]
    (tmp_path / "train" / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(ValueError, match="file_name"):
        FolderSource(tmp_path)


def test_tar_shards_are_read_by_offset_without_extracting(tmp_path):
    root = webdataset_shards(tmp_path / "shards", n_shards=2, per_shard=4)
    src = TarSource(tar_shards(root))
    assert len(src) == 8
    r = src[5]
    assert r.key == "00001.tar/000010001" and r.captions == ["tar caption 1 1"] and r.aesthetic == 6.0
    assert decode_rgb(r.image).shape == (90, 60, 3)
    # hostile member names and links are keys at most, never paths on disk
    evil = write_tar(
        tmp_path / "evil.tar",
        {
            "../../escape.jpg": jpeg(40, 40),
            "/abs/p.jpg": jpeg(40, 40),
            "dir/k.jpg": jpeg(40, 40),
            "dir/k.txt": b"nested",
            "lonely.txt": b"no image",
        },
        symlinks={"link.jpg": "/etc/passwd"},
    )
    before = set(os.listdir(tmp_path))
    src = TarSource([evil])
    keys = [src[i].key for i in range(len(src))]
    assert keys == ["evil.tar/../../escape", "evil.tar//abs/p", "evil.tar/dir/k"]
    assert src[2].captions == ["nested"] and src.no_image == 1
    assert set(os.listdir(tmp_path)) == before and not (tmp_path.parent / "escape.jpg").exists()


def test_tar_source_pickles_without_open_files(tmp_path):
    import pickle

    src = TarSource(tar_shards(webdataset_shards(tmp_path, 1, 2)))
    src[0]
    clone = pickle.loads(pickle.dumps(src))
    assert clone[1].captions == src[1].captions


def test_compressed_tar_is_refused_loudly(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        tar.add(write_folder(tmp_path / "f", {"a.jpg": (jpeg(40, 40), "c")}) / "a.jpg", "a.jpg")
    with pytest.raises(ValueError, match="uncompressed"):
        TarSource([tmp_path / "x.tar.gz"])


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    return tfds_dataset(tmp_path_factory.mktemp("tfds"), n=6)


def test_tfds_source_reads_encoded_images_and_text_without_tensorflow(tfds_dir):
    import sys

    src = TfdsSource(str(tfds_dir), "train", None, "image", "caption")
    assert len(src) == 6
    records = [src[i] for i in range(6)]
    assert sorted(c for r in records for c in r.captions) == [f"tfds caption {i}" for i in range(6)]
    assert {image_size(r.image) for r in records} == {(60, 90), (90, 60), (70, 70)}
    index, report = scan_source(src, bucket_table(SMALL_BUCKETS), ScanFilters())
    assert report.kept == 6 and len(index) == 6
    assert "tensorflow" not in sys.modules


def test_scan_counts_and_assigns(tmp_path):
    write_folder(
        tmp_path,
        {
            "w.jpg": (jpeg(40, 120), "wide"),
            "s.jpg": (jpeg(64, 64), "square"),
            "z.jpg": (b"", "empty"),
            "small.jpg": (jpeg(16, 16), "small"),
        },
    )
    buckets = bucket_table(SMALL_BUCKETS)
    index, report = scan_source(FolderSource(tmp_path), buckets, ScanFilters(min_original_size=32))
    assert report.to_json() == {
        "kept": 2,
        "skipped": {"empty_file": 1, "too_small": 1},
        "repaired": {},
        "buckets": {"128x128": 1, "192x64": 1},
    }  # fmt: skip  (3:1 exactly)
    assert index.original_size.tolist() == [[64, 64], [40, 120]]
    assert [buckets[b].name for b in index.bucket] == ["128x128", "192x64"]
    np.testing.assert_array_equal(index.record_ids, [0, 2])
