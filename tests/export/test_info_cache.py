"""``model_info`` parses a file once per command, and a file that changes is read again."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from deepspot.errors import CheckpointError
from deepspot.export import info as info_module
from deepspot.export import model_info, read_model_metadata


@pytest.fixture
def loads(monkeypatch):
    """Counts the files ``model_info`` actually parses (a fresh cache for each test)."""
    monkeypatch.setattr(info_module, "_CACHE", type(info_module._CACHE)())
    calls = []
    real = info_module._load

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(info_module, "_load", counting)
    return calls


def test_one_file_is_parsed_once(exported, loads):
    _, result = exported("spot", "subspot_neighbors")
    first = model_info(result.path)
    meta = read_model_metadata(result.path)
    checked = model_info(result.path, check_weights=True)
    assert len(loads) == 1
    assert meta == first.metadata and checked.inputs == first.inputs
    meta["genes"].append("NOT-A-GENE")  # a caller that edits what it got does not edit the cache
    assert "NOT-A-GENE" not in read_model_metadata(result.path)["genes"]


def test_a_rewritten_file_is_read_again(exported, loads, tmp_path):
    _, result = exported("spot", "subspot_neighbors")
    path = tmp_path / "m.onnx"
    proto = onnx.load(str(result.path))
    onnx.save(proto, str(path))
    assert read_model_metadata(path)["family"] == "spot"

    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    onnx.save(proto, str(path) + ".new")
    os.replace(str(path) + ".new", path)  # a new inode: what an atomic re-export does
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        model_info(path, check_weights=True)
    assert len(loads) == 2
    assert model_info(path).metadata["family"] == "spot"  # without the weight check, the same file reads fine
    assert len(loads) == 2
