"""Runs on buckets: URL checks, fail-fast probes, append and upload semantics, and `gs://` end to end
against a local GCS emulator (`tests/helpers/gcs_emulator.py` on loopback; gcsfs, TensorStore and
ArrayRecord's GCS reader pointed at it by STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL and
CLOUD_STORAGE_EMULATOR_ENDPOINT); `s3://` against moto's S3 server (AWS_ENDPOINT_URL)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sdxl_jax import storage
from tests.helpers.processes import child_env, free_port
from tests.helpers.train import REPO, child_command, losses, run_child, run_train, run_train_py


def _serve(cmd: list[str], port: int, env: dict, setup=lambda: None):
    """Run a storage emulator on loopback `port`, put `env` (its settings) into this process's
    environment, and so `child_env()`'s, run `setup`, and yield `env`; undone when the fixture ends."""
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} did not start") from None
                time.sleep(0.2)
        os.environ.update(env)
        setup()
        yield env
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator with the bucket `bucket`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}  # fmt: skip
    yield from _serve([sys.executable, "-m", "tests.helpers.gcs_emulator", str(port)], port, env)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with the bucket `bucket` (s3fs and boto find it by AWS_ENDPOINT_URL)."""
    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def bucket():
        import boto3

        boto3.client("s3").create_bucket(Bucket="bucket")

    yield from _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, env, bucket)


def test_urls_are_checked():
    with pytest.raises(storage.StorageError, match=r"did you mean gs://bucket/run"):
        storage.path("gs:/bucket/run")  # what pathlib makes of gs://bucket/run
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.path("gs://")
    with pytest.raises(storage.StorageError, match="unknown storage scheme ftp"):
        storage.path("ftp://host/x")
    assert not storage.is_remote(storage.path("runs/x")) and storage.is_remote(storage.path("gs://b/x"))
    assert str(storage.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"


def test_an_unwritable_local_location_fails_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(storage.StorageError, match=r"^--workdir .*/file/run is not usable: "):
        storage.check_writable(tmp_path / "file" / "run", "--workdir")
    assert storage.check_writable(tmp_path / "ok", "--workdir").is_dir()
    assert list((tmp_path / "ok").iterdir()) == []  # the probe is gone


def test_append_file_and_upload_tree_on_a_bucket(gcs, tmp_path):
    log = storage.AppendFile("gs://bucket/t/metrics.jsonl")
    log.write('{"step": 1}\n')
    log.flush()
    assert storage.path("gs://bucket/t/metrics.jsonl").read_text() == '{"step": 1}\n'
    log.close()
    again = storage.AppendFile("gs://bucket/t/metrics.jsonl")  # a resumed run continues the file
    again.write('{"step": 2}\n')
    again.close()
    assert storage.path("gs://bucket/t/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'

    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "index.json").write_text("{}")
    (tmp_path / "out" / "sub" / "a.bin").write_bytes(b"\x00" * 1000)
    storage.upload_tree(tmp_path / "out", "gs://bucket/t/out", last=("index.json",))
    assert storage.path("gs://bucket/t/out/sub/a.bin").read_bytes() == b"\x00" * 1000
    with pytest.raises(FileExistsError):
        storage.upload_tree(tmp_path / "out", "gs://bucket/t/out")


def test_a_missing_bucket_stops_train_py_in_one_line(gcs):
    start = time.monotonic()
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", "gs://no-such-bucket/run"]
    result = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: --workdir gs://no-such-bucket/run is not usable"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert seconds < 60, seconds  # before any compile (imports take most of it)


def _records(source) -> list:
    """Every record of a source, images as bytes (a local folder gives paths)."""
    out = []
    for i in range(len(source)):
        record = source[i]
        if isinstance(record, dict):  # a prepared record
            out.append({k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in record.items()})
            continue
        image = Path(record.image).read_bytes() if isinstance(record.image, str) else record.image
        out.append(record._replace(image=image))
    return out


PREPARE_ARGS = ["--buckets", "area=32,step=16,min=32,max=32", "--num_shards", "2", "--quiet"]


@pytest.fixture(scope="module")
def bucket_data(gcs, tmp_path_factory):
    """An image folder (sidecar captions and a metadata.jsonl), two WebDataset tars and prepared shards,
    on the disk (the returned folder) and under gs://bucket/data/ (images, tars, prepared)."""
    from sdxl_jax.data import prepare
    from tests.helpers.data_fixtures import mixed_folder, webdataset_shards

    root = tmp_path_factory.mktemp("data")
    folder = mixed_folder(root / "images", n=6)
    (folder / "more").mkdir()
    (folder / "more" / "metadata.jsonl").write_text('{"file_name": "x.jpg", "text": "from metadata"}\n')
    (folder / "more" / "x.jpg").write_bytes(next(folder.glob("*.jpg")).read_bytes())
    webdataset_shards(root / "tars")
    prepare.prepare(prepare.parse_args([str(folder), str(root / "prepared"), *PREPARE_ARGS]))
    for name in ("images", "tars", "prepared"):
        storage.upload_tree(root / name, f"gs://bucket/data/{name}")
    return root


def test_data_sources_read_from_a_bucket_as_from_a_disk(bucket_data, tmp_path):
    from sdxl_jax.data import prepare
    from sdxl_jax.data.sources import FolderSource, PreparedSource, TarSource, tar_shards

    local, remote = FolderSource(bucket_data / "images"), FolderSource("gs://bucket/data/images")
    assert remote.paths == local.paths and "more/x.jpg" in remote.paths
    assert _records(remote) == _records(local)
    tars = [str(p) for p in tar_shards("gs://bucket/data/tars")]
    assert tars == ["gs://bucket/data/tars/00000.tar", "gs://bucket/data/tars/00001.tar"]
    assert _records(TarSource(tars)) == _records(TarSource(tar_shards(bucket_data / "tars")))
    remote = PreparedSource("gs://bucket/data/prepared")  # ArrayRecord reads the shards from the bucket itself
    assert remote.shard_paths[0].startswith("gs://bucket/data/prepared/")
    assert _records(remote) == _records(PreparedSource(bucket_data / "prepared"))
    # raw images in the bucket, prepared into local shards
    prepare.prepare(prepare.parse_args(["gs://bucket/data/images", str(tmp_path / "from_bucket"), *PREPARE_ARGS]))
    assert _records(PreparedSource(tmp_path / "from_bucket")) == _records(PreparedSource(bucket_data / "prepared"))
    with pytest.raises(ValueError, match="local disks and gs:// only"):
        PreparedSource("s3://bucket/prepared")


def test_array_record_shards_past_the_footer_prefetch_read_from_a_bucket(gcs, tmp_path):
    """Real shards are MBs: ArrayRecord fetches the last 1 MiB first (a suffix range), then the rest."""
    import grain
    from array_record.python.array_record_module import ArrayRecordWriter

    records = [np.random.default_rng(i).bytes(150_000) for i in range(20)]  # 3 MB
    writer = ArrayRecordWriter(str(tmp_path / "big.array_record"), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    storage.upload_tree(tmp_path / "big.array_record", "gs://bucket/big/shard.array_record")
    source = grain.sources.ArrayRecordDataSource(["gs://bucket/big/shard.array_record"])
    assert [source[i] for i in range(len(source))] == records


def test_prepare_writes_into_a_bucket_and_resumes_from_it(bucket_data, monkeypatch):
    from sdxl_jax.data import prepare
    from sdxl_jax.data.sources import PreparedSource

    out = "gs://bucket/data/prepared_here"
    prepare.prepare(prepare.parse_args([str(bucket_data / "images"), out, *PREPARE_ARGS]))
    want = _records(PreparedSource(bucket_data / "prepared"))
    assert _records(PreparedSource(out)) == want
    # a run cut off after its first shard: the second shard's record list and the index never arrived
    for name in ("shard-00001-of-00002.json", "index.json"):
        (storage.path(out) / name).unlink()
    written = []
    real = prepare.write_shard
    monkeypatch.setattr(prepare, "write_shard", lambda s, *a: written.append(s) or real(s, *a))
    prepare.prepare(prepare.parse_args([str(bucket_data / "images"), out, *PREPARE_ARGS]))
    assert written == [1]  # shard 0 was taken from the bucket
    assert _records(PreparedSource(out)) == want


@pytest.mark.slow
@pytest.mark.parametrize("source", ["prepared", "tar"])
def test_train_py_streams_its_data_from_a_bucket(bucket_data, source):
    """train.py with its data and its workdir in the bucket, the data read in a grain worker process."""
    run = f"gs://bucket/run_{source}"
    data = f"gs://bucket/data/{source}s" if source == "tar" else f"gs://bucket/data/{source}"
    flags = ["--config.num_steps=2", "--config.checkpoint_every=2", f"--config.data.source={source}",
             f"--config.data.path={data}", "--config.data.num_workers=1", "--config.batch_size=4"]  # fmt: skip
    result = run_train_py(run, *flags, config="configs/tiny.py:folder")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (storage.path(run) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"loss"' in line] == [1, 2]
    assert [p.name for p in (storage.path(run) / "checkpoints").iterdir()] == ["2"]


def _random_tiny_weights():
    """(models, abstract params, PipelineWeights with random fp32 params) of the tiny base config."""
    import flax.linen as nn

    from configs.tiny import tiny_models
    from sdxl_jax.convert import PipelineWeights
    from sdxl_jax.train.state import abstract_params

    models = tiny_models(refiner=False)
    rng = np.random.default_rng(0)
    abstract = nn.meta.unbox(abstract_params(models))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    return models, abstract, PipelineWeights("base", {n: (models.config(n), params[n]) for n in models.components})


@pytest.mark.slow  # test budget: run before resolving, not in the default run
def test_init_from_reads_a_project_checkpoint_from_a_bucket(gcs):
    """The trainer's `init_from` (the loader `sample.py` uses too), placed as it reads, from gs://."""
    from sdxl_jax.convert import save_project
    from sdxl_jax.train.state import load_params

    models, abstract, weights = _random_tiny_weights()
    save_project(weights, "gs://bucket/w")
    whole = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.sharding.PartitionSpec())
    loaded = load_params(models, "gs://bucket/w", jax.tree.map(lambda _: whole, abstract))
    want = {n: weights.params(n) for n in models.components}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # test budget: run before resolving, not in the default run
def test_lora_files_are_written_to_and_merged_from_a_bucket(gcs):
    from sdxl_jax.convert.lora import merge_loras, save_lora, target_kernels
    from sdxl_jax.train.lora import LoraSpec, init_adapters

    _, _, weights = _random_tiny_weights()
    spec = LoraSpec(rank=2, alpha=1.0)
    kernels = target_kernels(weights, spec)
    adapters = init_adapters(jax.random.key(0), kernels, spec)
    rng = np.random.default_rng(1)
    for adapter in adapters.values():
        adapter["up"] = rng.standard_normal(adapter["up"].shape).astype(np.float32)
    save_lora(adapters, spec, weights, "gs://bucket/loras/style.safetensors")
    with pytest.raises(FileExistsError):
        save_lora(adapters, spec, weights, "gs://bucket/loras/style.safetensors")
    merged = merge_loras(weights, [("gs://bucket/loras/style.safetensors", 0.7)])  # ranged reads
    changed = 0
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for a, b in zip(jax.tree.leaves(merged.params(name)), jax.tree.leaves(weights.params(name)), strict=True):
            changed += not np.array_equal(a, b)
    assert changed == len(kernels)


def test_s3_probes_logs_and_weights_work_and_checkpoints_are_refused_in_one_line(s3, tmp_path):
    from safetensors.numpy import save_file

    from sdxl_jax.convert.files import LazySafetensors

    assert storage.check_writable("s3://bucket/run", "--workdir") == storage.path("s3://bucket/run")
    with pytest.raises(storage.StorageError, match=r"^--workdir s3://no-such-bucket/run is not usable: "):
        storage.check_writable("s3://no-such-bucket/run", "--workdir")
    log = storage.AppendFile("s3://bucket/run/metrics.jsonl")
    log.write("a\n")
    log.close()
    again = storage.AppendFile("s3://bucket/run/metrics.jsonl")
    again.write("b\n")
    again.close()
    assert storage.path("s3://bucket/run/metrics.jsonl").read_text() == "a\nb\n"
    tensors = {"x": np.arange(12, dtype=np.float16).reshape(3, 4), "y": np.ones(5, np.float32)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    storage.upload_tree(tmp_path, "s3://bucket/weights")
    remote = LazySafetensors("s3://bucket/weights/w.safetensors")  # ranged reads
    for key, value in tensors.items():
        np.testing.assert_array_equal(remote[key], value)
    with pytest.raises(storage.StorageError, match="cannot live on s3://"):
        storage.orbax_path("s3://bucket/run/checkpoints", "--workdir")
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", "s3://bucket/run"]
    result = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: --workdir s3://bucket/run/checkpoints: Orbax"), result.stderr[-2000:]


@pytest.mark.slow
def test_train_resume_export_sample_and_convert_on_a_bucket(gcs, tmp_path):
    common = {"num_steps": 3, "checkpoint_every": 1, "max_checkpoints": 5}
    straight = run_train(tmp_path / "local", common)
    run = "gs://bucket/run"
    run_train(run, common | {"num_steps": 2})  # stops after its step-2 checkpoint, as a killed run would
    resumed = run_train(run, common | {"export_on_finish": "project"})
    assert resumed["losses"] == straight["losses"]
    for name, value in straight["arrays"].items():
        np.testing.assert_array_equal(resumed["arrays"][name], value, err_msg=name)
    bucket = storage.path(run)
    assert sorted(p.name for p in (bucket / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert (bucket / "config.json").exists()
    from sdxl_jax.train.tensorboard import read_events

    files = list((bucket / "tensorboard").iterdir())  # one per run: the first and the resumed one
    assert len(files) == 2
    assert {e["step"] for f in files for e in read_events(f) if e.get("scalars")} == {1, 2, 3}
    assert (bucket / "export" / "sdxl_jax" / "sdxl_jax.json").exists()

    sample = [sys.executable, "sample.py", "--config", "configs/sdxl_base.py",
              f"--config.checkpoint={run}/export/sdxl_jax", "--prompt", "a red cube", "--steps", "2",
              "--outdir", "gs://bucket/out", "--config.compilation_cache=none"]  # fmt: skip
    result = subprocess.run(sample, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in storage.path("gs://bucket/out").iterdir()] == ["00000000.png"]

    # sdxl-convert from the bucket into it (a diffusers folder, uploaded with model_index.json last), and
    # back out of it (its safetensors read by ranged reads) into a local project checkpoint
    convert = [
        sys.executable,
        "-m",
        "sdxl_jax.convert",
        f"{run}/export/sdxl_jax",
        "gs://bucket/diffusers",
        "--to",
        "diffusers",
    ]
    result = subprocess.run(convert, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    back = [sys.executable, "-m", "sdxl_jax.convert", "gs://bucket/diffusers", str(tmp_path / "back")]
    result = subprocess.run(back, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from sdxl_jax.convert.pipeline_weights import load_project

    exported, local = load_project(f"{run}/export/sdxl_jax"), load_project(tmp_path / "back")
    for name, (_, params) in exported.components.items():
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(local.params(name)), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_run_killed_on_a_bucket_resumes_from_its_last_complete_checkpoint(gcs, tmp_path):
    """kill -9 while the third checkpoint is being written into the bucket: restore lists only complete
    steps, the unfinished one is cleaned up, and the resumed run ends bitwise where a straight one does."""
    common = {"num_steps": 6, "checkpoint_every": 1, "max_checkpoints": 10}
    straight = run_train(tmp_path / "local", common)
    run = "gs://bucket/run_killed"
    checkpoints = storage.path(run) / "checkpoints"
    cmd = child_command(tmp_path / "unused", tmp_path / "unused.npz", common)
    cmd[-2] = run  # the child's workdir
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (checkpoints / "3").exists():  # the third save has begun
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    complete = sorted(int(p.name) for p in checkpoints.iterdir() if (p / "commit_success.txt").exists())
    assert complete and complete[-1] <= 3
    resumed = run_train(run, common)
    assert {k: v for k, v in resumed["losses"].items()} == straight["losses"]
    for name, value in straight["arrays"].items():
        np.testing.assert_array_equal(resumed["arrays"][name], value, err_msg=name)
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == [str(step) for step in range(1, 7)], names  # no unfinished step left behind
    assert all((checkpoints / name / "commit_success.txt").exists() for name in names)


@pytest.mark.slow
def test_two_hosts_train_into_one_bucket_and_the_checkpoint_restores(gcs, tmp_path):
    """2 processes x 4 fake devices (`jax.distributed` on loopback) with their workdir in the bucket: the
    same losses as one process locally, every process's data-iterator shard in the checkpoint, and the
    checkpoint restores in a single process straight from the bucket."""
    from tests.test_train_multiprocess import COMMON, RESTORE

    single = run_child(tmp_path / "single", COMMON, devices=8)
    run, port = "gs://bucket/multi", free_port()
    children = []
    for process_id in range(2):
        overrides = COMMON | {"distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
                              "distributed.num_processes": 2, "distributed.process_id": process_id}  # fmt: skip
        cmd = child_command(tmp_path / "unused", tmp_path / "multi.npz", overrides)
        cmd[-2] = run
        children.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(devices=4), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [c.communicate(timeout=900)[0] for c in children]
    for c, text in zip(children, outputs):
        assert c.returncode == 0 and "CHILD DONE" in text, text[-5000:]
    got = losses(run)
    for step in (1, 2, 3):
        np.testing.assert_allclose(got[step], single["losses"][step], rtol=1e-5)
    shards = sorted(p.name for p in (storage.path(run) / "checkpoints" / "3" / "data").glob("process_*"))
    assert shards == ["process_0-of-2.json", "process_1-of-2.json"]
    result = subprocess.run([sys.executable, "-c", RESTORE, run, str(tmp_path / "restored.npz")], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0 and "RESTORED 1 1 3" in result.stdout, result.stdout[-2000:] + result.stderr[-5000:]
    restored, multi = dict(np.load(tmp_path / "restored.npz")), dict(np.load(tmp_path / "multi.npz"))
    for name, value in multi.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
