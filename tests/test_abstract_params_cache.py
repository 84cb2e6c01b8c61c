"""Traced parameter trees kept on disk (`models.config.use_disk_cache`): read back equal, never stale."""

import functools
import json

import jax
import pytest

from sdxl_jax.models import config, unet
from sdxl_jax.models.unet import UNetConfig


@pytest.fixture
def disk_cache(tmp_path):
    config.use_disk_cache(tmp_path)
    yield tmp_path
    config.use_disk_cache(None)


def _untraceable(monkeypatch):
    """Make tracing the UNet fail, under the same name (the cache key), so only the disk can answer."""
    real = unet._trace_params

    @functools.wraps(real)
    def refuse(*args):
        raise AssertionError("traced again")

    monkeypatch.setattr(unet, "_trace_params", refuse)


def test_a_tree_is_read_back_equal_without_tracing(disk_cache, monkeypatch):
    cfg = UNetConfig.tiny()
    traced = unet.abstract_params(cfg)
    [entry] = disk_cache.glob("*.json")
    config.use_disk_cache(disk_cache)  # a new process: nothing in memory
    _untraceable(monkeypatch)
    read = unet.abstract_params(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"))  # same tree, other dtypes
    assert jax.tree.structure(read) == jax.tree.structure(traced)  # the logical axis names included
    assert [x.shape for x in jax.tree.leaves(read)] == [x.shape for x in jax.tree.leaves(traced)]
    assert {x.dtype.name for x in jax.tree.leaves(read)} == {"bfloat16"}
    with pytest.raises(AssertionError, match="traced again"):  # another architecture is not in the cache
        unet.abstract_params(cfg.replace(model_channels=cfg.model_channels * 2))
    assert entry.exists()


def test_a_model_source_change_or_a_damaged_entry_traces_again(disk_cache, monkeypatch):
    cfg = UNetConfig.tiny()
    unet.abstract_params(cfg)
    [entry] = disk_cache.glob("*.json")
    config.use_disk_cache(disk_cache)
    monkeypatch.setattr(config, "_models_source_digest", lambda: "edited")
    _untraceable(monkeypatch)
    with pytest.raises(AssertionError, match="traced again"):
        unet.abstract_params(cfg)
    monkeypatch.undo()
    entry.write_text(json.dumps([["not", "a", "row"]]))
    config.use_disk_cache(disk_cache)
    tree = unet.abstract_params(cfg)  # traced again, and written back whole
    assert len(json.loads(entry.read_text())) == len(jax.tree.leaves(tree))
