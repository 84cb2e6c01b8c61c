"""`prepare`: raw folder -> ArrayRecord shards + index + report; resumable; bad inputs; cached latents."""

import json

import numpy as np
import pytest

from sdxl_jax.data import default_data_config, make_loader
from sdxl_jax.data import prepare as prep
from sdxl_jax.data.index import load_prepared_index
from sdxl_jax.data.sources import FolderSource, PreparedSource
from tests.helpers.data_fixtures import SMALL_BUCKETS, bad_corpus, mixed_folder


def run_prepare(src, out, *extra):
    return prep.prepare(prep.parse_args([str(src), str(out), "--buckets", SMALL_BUCKETS, "--quiet", *extra]))


def loader_config(path, **overrides):
    c = default_data_config()
    c.update(dict(path=str(path), buckets=SMALL_BUCKETS, num_workers=0, record_ids=True, caption_dropout=0.2,
                  flip_prob=0.5, num_epochs=1, remainder="carry") | overrides)  # fmt: skip
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return mixed_folder(tmp_path_factory.mktemp("mixed"), n=16)


def test_prepared_shards_index_report_and_same_batches_as_the_raw_folder(folder, tmp_path):
    report = run_prepare(folder, tmp_path / "out", "--num_shards", "3")
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == {
        "kept": 16,
        "skipped": {},
        "repaired": {},
        "buckets": {"128x128": 4, "160x96": 4, "192x64": 4, "96x160": 4},
    }
    assert report.to_json() == written
    index = load_prepared_index(tmp_path / "out")
    assert index.num_records == 16 and len(index.shards) == 3 and index.kind == "images"
    # the same seed gives the same plan, crops, flips and captions from shards as from the raw folder
    raw = list(make_loader(loader_config(folder), seed=7, global_batch_size=4, process_index=0, process_count=1))
    prepared = list(make_loader(loader_config(tmp_path / "out", source="prepared"), seed=7, global_batch_size=4,
                                process_index=0, process_count=1))  # fmt: skip
    assert len(raw) == len(prepared) == 4
    for a, b in zip(raw, prepared):
        for k in a:
            if k != "images":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert np.abs(a["images"].astype(int) - b["images"]).mean() < 3  # one extra JPEG generation
    with pytest.raises(ValueError, match="prepared with buckets"):
        make_loader(loader_config(tmp_path / "out", source="prepared", buckets="sdxl"), seed=0, global_batch_size=4)


def test_prepare_resumes_where_it_stopped(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = prep.write_shard

    def fail_on_shard_2(s, *args):
        if s == 2:
            raise KeyboardInterrupt  # the user pressed ^C while shard 2 was being written
        return real(s, *args)

    monkeypatch.setattr(prep, "write_shard", fail_on_shard_2)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(folder, out, "--num_shards", "4")
    assert not (out / "index.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.array_record")}
    assert sorted(done) == ["shard-00000-of-00004.array_record", "shard-00001-of-00004.array_record"]
    calls = []
    monkeypatch.setattr(prep, "write_shard", lambda s, *a: calls.append(s) or real(s, *a))
    run_prepare(folder, out, "--num_shards", "4")
    assert calls == [2, 3]  # only the unfinished shards
    assert {p: (out / p).stat().st_mtime_ns for p in done} == done
    fresh = tmp_path / "fresh"
    run_prepare(folder, fresh, "--num_shards", "4")
    a, b = load_prepared_index(out), load_prepared_index(fresh)
    np.testing.assert_array_equal(a.bucket, b.bucket)
    np.testing.assert_array_equal(a.original_size, b.original_size)
    with pytest.raises(SystemExit, match="other settings"):
        run_prepare(folder, out, "--num_shards", "5")


def test_bad_corpus_is_skipped_or_repaired_and_counted(tmp_path):
    root = tmp_path / "bad"
    expected = bad_corpus(root)
    report = run_prepare(root, tmp_path / "out").to_json()
    skip_reasons = [v for v in expected.values() if not v.startswith("kept")]
    repairs = [v.split(":")[1] for v in expected.values() if v.startswith("kept:")]
    assert report["kept"] == list(expected.values()).count("kept") + len(repairs)
    assert report["skipped"] == {r: skip_reasons.count(r) for r in skip_reasons}
    assert report["repaired"] == {r: repairs.count(r) for r in repairs}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report

    # the loader on the raw folder: header-level problems are skipped up front, the truncated JPEG
    # (whose header is fine) is replaced by a stand-in; every good record comes through
    keys = FolderSource(root).paths
    c = loader_config(root, caption_dropout=0.0, remainder="drop", flip_prob=0.0)
    seen = {}
    for batch in make_loader(c, seed=0, global_batch_size=1, process_index=0, process_count=1):
        seen[keys[int(batch["record_id"][0])]] = {k: v[0] for k, v in batch.items()}
    good = {k for k, v in expected.items() if v.startswith("kept")}
    assert set(seen) == good
    assert seen["tiny.png"]["original_size"].tolist() == [1, 1] and (seen["tiny.png"]["images"] == [0, 255, 0]).all()
    assert seen["rotated.jpg"]["original_size"].tolist() == [90, 60]
    assert seen["no_caption.jpg"]["drop_text"] and seen["empty_caption.jpg"]["drop_text"]
    assert not seen["latin1.jpg"]["drop_text"] and seen["long_caption.jpg"]["eot_l"] == 76
    red = seen["cmyk.jpg"]["images"].reshape(-1, 3).mean(0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    # and from the prepared shards: exactly the kept records
    batches = list(make_loader(loader_config(tmp_path / "out", source="prepared", caption_dropout=0.0), seed=0,
                               global_batch_size=1, process_index=0, process_count=1))  # fmt: skip
    assert len(batches) == report["kept"]


# ---- --cache_latents ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A structurally complete tiny SDXL base (random weights) in the project format."""
    import flax.linen as nn
    import jax

    from sdxl_jax.convert import PipelineWeights, save_project
    from sdxl_jax.convert.pipeline_weights import ABSTRACT_PARAMS
    from sdxl_jax.models.clip import CLIPTextConfig
    from sdxl_jax.models.unet import UNetConfig
    from sdxl_jax.models.vae import VAEConfig

    text = dict(vocab_size=49408, max_position_embeddings=77, intermediate_size=64, num_layers=2, num_heads=4)
    configs = dict(
        unet=UNetConfig.tiny(context_dim=72, adm_in_channels=24 + 6 * 4),
        vae=VAEConfig.tiny(),
        text_encoder=CLIPTextConfig(hidden_size=32, **text),
        text_encoder_2=CLIPTextConfig(hidden_size=40, activation="gelu", projection_dim=24, **text),
    )
    rng = np.random.default_rng(0)
    components = {}
    for name, cfg in configs.items():
        shapes = nn.meta.unbox(ABSTRACT_PARAMS[name](cfg))
        components[name] = (
            cfg,
            jax.tree_util.tree_map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes),
        )
    return save_project(PipelineWeights("base", components), tmp_path_factory.mktemp("ckpt") / "tiny_base")


def test_cache_latents_stores_what_the_encoders_compute(tiny_checkpoint, tmp_path):
    from sdxl_jax.data.latent_cache import LatentEncoder
    from tests.helpers.data_fixtures import jpeg, write_folder

    # two buckets (a square and a 2:1) keep the compile count, hence the test time, down
    folder = write_folder(tmp_path / "raw", {f"{i}.jpg": (jpeg(*[(70, 70), (40, 80)][i % 2], seed=i), f"picture {i}")
                                             for i in range(7)})  # fmt: skip
    out = tmp_path / "latents"
    buckets = ["--buckets", "area=64,step=32"]
    report = prep.prepare(prep.parse_args([str(folder), str(out), "--quiet", "--cache_latents", "--checkpoint",
                                           str(tiny_checkpoint), "--batch_size", "3", *buckets]))  # fmt: skip
    assert report.kept == 7 and load_prepared_index(out).kind == "latents"
    c = loader_config(out, source="prepared", buckets="area=64,step=32", caption_dropout=0.0, flip_prob=0.0)
    batches = list(make_loader(c, seed=0, global_batch_size=2, process_index=0, process_count=1))
    assert sum(len(b["record_id"]) for b in batches) == 6  # 4 squares + 3 wide, carried: 2 + 1 batches
    encoder = LatentEncoder(str(tiny_checkpoint), batch_size=3)
    raw = FolderSource(folder)
    for batch in batches[:3]:
        assert "images" not in batch
        h, w = batch["target_size"][0]
        assert batch["latent_moments"].shape == (2, h // 8, w // 8, 8) and batch["latent_moments"].dtype == np.float32
        assert batch["context"].shape == (2, 77, 72) and batch["pooled"].shape == (2, 24)
        # recompute one example from the raw image: the centre crop, its caption
        from PIL import Image

        from sdxl_jax.data.buckets import Bucket
        from sdxl_jax.data.transforms import crop_to_bucket

        key = PreparedSource(out)[int(batch["record_id"][0])]["key"]  # ids are positions in the shards
        record = raw[raw.paths.index(key)]
        crop = crop_to_bucket(Image.open(record.image).convert("RGB"), tuple(batch["original_size"][0]), Bucket(h, w),
                              np.random.default_rng(0), random_crop=False)  # fmt: skip
        assert tuple(batch["crop_top_left"][0]) == crop.crop_top_left
        ref = encoder.encode(crop.pixels[None], record.captions[:1])
        for k in ("latent_moments", "context", "pooled"):
            np.testing.assert_allclose(batch[k][0], ref[k][0].astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=k)
        np.testing.assert_array_equal(batch["ids_g"][0], ref["ids_g"][0])
