"""Reading weight files: safetensors (single, sharded), safe pickles, variants, and loud refusals; and
the strict conversion every component's state dict goes through."""

import json
import os
import pickle
import threading

import jax
import numpy as np
import pytest
import torch
from flax.linen import meta
from safetensors.numpy import save_file

from sdxl_jax.convert import (
    COMPONENTS,
    ConversionError,
    read_state_dict,
    text_encoder_params_from_transformers,
    text_encoder_params_to_transformers,
    unet_params_from_diffusers,
    unet_params_to_diffusers,
    vae_params_from_diffusers,
    vae_params_to_diffusers,
)
from sdxl_jax.convert.files import component_weights, open_state_dict, source_files
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig

TENSORS = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(4, np.float16)}


def assert_same(state, expected=TENSORS):
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert state[k].dtype == v.dtype
        np.testing.assert_array_equal(state[k], v)


def test_safetensors_single_and_sharded(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    assert_same(read_state_dict(tmp_path / "model.safetensors"))
    save_file({"a.weight": TENSORS["a.weight"]}, tmp_path / "m-1.safetensors")
    save_file({"b.bias": TENSORS["b.bias"]}, tmp_path / "m-2.safetensors")
    index = {"weight_map": {"a.weight": "m-1.safetensors", "b.bias": "m-2.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    assert_same(read_state_dict(tmp_path / "m.safetensors.index.json"))
    sharded = open_state_dict(tmp_path / "m.safetensors.index.json")  # what a loader reads ahead
    assert [p.name for p in source_files(sharded)] == ["m-1.safetensors", "m-2.safetensors"]


def test_sharded_index_naming_a_missing_tensor_is_refused(tmp_path):
    save_file({"a.weight": TENSORS["a.weight"]}, tmp_path / "m-1.safetensors")
    index = {"weight_map": {"a.weight": "m-1.safetensors", "ghost": "m-1.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="index names tensors no shard holds: \\['ghost'\\]"):
        read_state_dict(tmp_path / "m.safetensors.index.json")


def test_weights_only_pickle_and_lightning_wrapper(tmp_path):
    torch.save({k: torch.from_numpy(v) for k, v in TENSORS.items()}, tmp_path / "model.bin")
    assert_same(read_state_dict(tmp_path / "model.bin"))
    torch.save(
        {"state_dict": {k: torch.from_numpy(v) for k, v in TENSORS.items()}, "global_step": 7}, tmp_path / "x.ckpt"
    )
    assert_same(read_state_dict(tmp_path / "x.ckpt"))


class Payload:
    def __reduce__(self):
        return (print, ("this code must never run",))


def test_pickle_with_a_code_payload_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"a": Payload()}, f)
    with pytest.raises(ConversionError, match="refused or unreadable as a weights-only PyTorch pickle"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert "must never run" not in capsys.readouterr().out


def test_truncated_and_unknown_files_are_refused(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        read_state_dict(tmp_path / "cut.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ConversionError, match="unknown weights format"):
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_state_dict(tmp_path / "absent.safetensors")


def test_component_weights_prefers_safetensors_and_finds_variants(tmp_path):
    for name in ("model.bin", "model.safetensors", "model.fp16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert component_weights(tmp_path, "model").name == "model.safetensors"
    assert component_weights(tmp_path, "model", "fp16").name == "model.fp16.safetensors"
    (tmp_path / "model.safetensors").unlink()
    assert component_weights(tmp_path, "model").name == "model.bin"
    with pytest.raises(
        FileNotFoundError,
        match=r"no model.bf16.safetensors / .bin .* it holds \['model.bin', 'model.fp16.safetensors'\]",
    ):
        component_weights(tmp_path, "model", "bf16")


# Component -> (tiny config, to PyTorch, from PyTorch, a key to delete, an unexpected (key, tensor), a
# mis-shaped (key, tensor), an ignorable buffer (key, tensor) or None).
STRICT_CASES = {
    "unet": (
        UNetConfig.tiny(),
        unet_params_to_diffusers,
        unet_params_from_diffusers,
        "mid_block.attentions.0.proj_in.weight",
        ("mid_block.attentions.0.extra.weight", np.zeros(3, np.float32)),
        ("conv_in.weight", np.zeros((32, 4, 5, 5), np.float32)),
        ("denoiser.sigmas", np.zeros(1000, np.float32)),
    ),
    "vae": (
        VAEConfig.tiny(),
        vae_params_to_diffusers,
        vae_params_from_diffusers,
        "decoder.mid_block.attentions.0.to_k.bias",
        ("encoder.mid_block.attentions.0.extra.weight", np.zeros(3, np.float32)),
        ("decoder.conv_in.weight", np.zeros((64, 4, 5, 5), np.float32)),
        None,
    ),
    "text_encoder": (
        CLIPTextConfig.tiny(projection_dim=8),
        text_encoder_params_to_transformers,
        text_encoder_params_from_transformers,
        "text_model.encoder.layers.1.mlp.fc2.bias",
        ("text_model.encoder.layers.3.mlp.fc2.bias", np.zeros(32, np.float32)),  # a layer too many
        ("text_model.final_layer_norm.weight", np.zeros(31, np.float32)),
        ("text_model.embeddings.position_ids", np.arange(16)[None]),
    ),
}


@pytest.mark.parametrize("component", sorted(STRICT_CASES))
def test_strict_conversion_names_every_offender(component):
    cfg, to_torch, from_torch, missing, unexpected, mis_shaped, ignorable = STRICT_CASES[component]
    abstract = meta.unbox(COMPONENTS[component].abstract_params(cfg))
    good = to_torch(jax.tree.map(lambda s: np.broadcast_to(np.float32(1), s.shape), abstract), cfg)
    from_torch(good, cfg)  # the complete dict converts
    broken = dict(good)
    del broken[missing]
    broken.update([unexpected, mis_shaped] + ([ignorable] if ignorable else []))  # ignorable: no complaint
    with pytest.raises(ConversionError) as err:
        from_torch(broken, cfg)
    text = str(err.value)
    assert "missing (1)" in text and missing in text
    assert "unexpected (1)" in text and unexpected[0] in text
    assert "shape mismatch (1)" in text and mis_shaped[0] in text
    if ignorable:
        assert ignorable[0].split(".")[-1] not in text  # not even its last name: "position_ids", "sigmas"


def test_safetensors_tensors_are_read_aligned_so_cpu_placement_copies_nothing(tmp_path):
    from sdxl_jax.convert.files import ALIGNMENT, LazySafetensors

    # odd-sized tensors, so the file offsets are not aligned themselves
    tensors = {f"t{i}": np.arange(i * 7 + 3, dtype=np.float16).reshape(-1, 1) for i in range(5)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    state = LazySafetensors(tmp_path / "a.safetensors")
    for key, want in tensors.items():
        got = state[key]
        assert got.ctypes.data % ALIGNMENT == 0
        np.testing.assert_array_equal(got, want)
    placed = jax.device_put(got)
    assert placed.unsafe_buffer_pointer() == got.ctypes.data  # XLA:CPU aliased the host array


def test_byte_ranges_hold_the_tensors_and_prefetch_asks_for_them_in_order(tmp_path, monkeypatch):
    from sdxl_jax.convert import files

    tensors = {f"t{i}": np.arange(i * 5 + 1, dtype=np.float32) for i in range(4)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    state = files.LazySafetensors(tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    for key, want in tensors.items():
        [(path, offset, length)] = state.byte_ranges([key])
        assert path == state.path and offset == state.offset(key)
        assert raw[offset : offset + length] == want.tobytes()
    whole = state.byte_ranges(sorted(tensors))  # adjacent in the file: one range
    assert len(whole) == 1 and whole[0][1] + whole[0][2] == len(raw)
    order = ["t3", "t0"]
    asked = []
    monkeypatch.setattr(files.Prefetch, "STEP", 8)
    monkeypatch.setattr(files.os, "posix_fadvise", lambda fd, offset, n, advice: asked.append((offset, n, advice)))
    with files.Prefetch(state.byte_ranges(order) + [("gs://bucket/x.safetensors", 0, 100)]) as ahead:
        ahead._thread.join()
    expected = []
    for _, offset, length in state.byte_ranges(order):  # 8-byte steps, t3 before t0; the bucket skipped
        steps = range(offset, offset + length, 8)
        expected += [(o, min(8, offset + length - o), os.POSIX_FADV_WILLNEED) for o in steps]
    assert asked == expected


def test_prefetch_stops_when_the_loader_is_done_and_ignores_missing_files(tmp_path, monkeypatch):
    from sdxl_jax.convert import files

    (tmp_path / "big").write_bytes(b"\0" * 4096)
    started, release, asked = threading.Event(), threading.Event(), []

    def slow(fd, offset, n, advice):
        asked.append(offset)
        started.set()
        release.wait()

    monkeypatch.setattr(files.Prefetch, "STEP", 1)
    monkeypatch.setattr(files.os, "posix_fadvise", slow)
    with files.Prefetch(files.whole_files([tmp_path])) as ahead:
        started.wait()
        threading.Timer(0.2, release.set).start()  # the first step ends after the loader is done
    assert not ahead._thread.is_alive() and asked == [0]  # not the other 4095 steps
    with files.Prefetch([(tmp_path / "gone", 0, 10)]):  # the read that follows reports it, not the prefetch
        pass
