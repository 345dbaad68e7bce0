"""Tests of FeatureCache: the in-memory LRU, the folder behind it and unreadable files."""

from __future__ import annotations

import pytest
import torch
from structlog.testing import capture_logs

from libra_model.feature_cache import FeatureCache, cache_file_name

CPU = torch.device("cpu")


def _features(value: float) -> torch.Tensor:
    return torch.full((1, 4, 8), value)


def test_cache_file_name_keeps_uid():
    assert cache_file_name("1.2.840.10008.1") == "1.2.840.10008.1.safetensors"


def test_cache_file_name_hashes_other_keys():
    name = cache_file_name("../../etc/passwd")
    assert "/" not in name
    assert len(name) == 64 + len(".safetensors")


def test_memory_cache_evicts_least_recent():
    cache = FeatureCache(2)
    cache.put("1.1", _features(1))
    cache.put("1.2", _features(2))
    assert cache.get("1.1", CPU, torch.float32) is not None
    cache.put("1.3", _features(3))
    assert cache.get("1.2", CPU, torch.float32) is None
    assert cache.get("1.1", CPU, torch.float32) is not None


def test_folder_entry_read_by_new_cache(tmp_path):
    FeatureCache(4, tmp_path).put("1.2.3", _features(7))
    loaded = FeatureCache(4, tmp_path).get("1.2.3", CPU, torch.float32)
    assert torch.equal(loaded, _features(7))


def test_folder_entry_converted_to_dtype(tmp_path):
    FeatureCache(0, tmp_path).put("1.2.3", _features(0.5))
    loaded = FeatureCache(0, tmp_path).get("1.2.3", CPU, torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


def test_folder_leaves_no_temporary_files(tmp_path):
    FeatureCache(0, tmp_path).put("1.2.3", _features(1))
    assert [path.name for path in tmp_path.iterdir()] == ["1.2.3.safetensors"]


def test_unreadable_entry_is_logged_and_removed(tmp_path):
    (tmp_path / cache_file_name("1.2.3")).write_bytes(b"not safetensors")
    with capture_logs() as logs:
        assert FeatureCache(4, tmp_path).get("1.2.3", CPU, torch.float32) is None
    assert [entry["event"] for entry in logs] == ["feature_cache.entry_unreadable"]
    assert not (tmp_path / cache_file_name("1.2.3")).exists()


def test_negative_size_rejected():
    with pytest.raises(ValueError, match="is negative"):
        FeatureCache(-1)
