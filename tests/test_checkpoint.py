"""Checkpoints: a round trip that rebuilds the model alone, and clear errors for bad files."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deepspot
from deepspot import create_model
from deepspot.checkpoint import read_metadata
from deepspot.errors import CheckpointError
from deepspot.scaler import Scaler


def _model():
    m = create_model(
        "cell", "neighbors", input_size=6, output_size=3, phi2rho_size=4, n_ensemble=3, agg_neighbors="sum"
    )
    m.scaler = Scaler("standard", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    m.genes = ["A", "B", "C"]
    m.history = {"train_loss": [1.0, 0.5]}
    return m.eval()


def test_round_trip_rebuilds_everything(tmp_path):
    model = _model()
    path = deepspot.save(model, tmp_path / "m.safetensors")
    loaded = deepspot.load(path)
    assert type(loaded) is type(model) and loaded.mode == model.mode and not loaded.training
    assert loaded.config == model.config and loaded.genes == ["A", "B", "C"]
    assert loaded.history == {"train_loss": [1.0, 0.5]}
    np.testing.assert_array_equal(loaded.scaler.scale, model.scaler.scale)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    x = {"cell": torch.randn(4, 1, 6), "neighbors": torch.randn(4, 5, 6)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), model(**x), rtol=0, atol=0)
    meta = read_metadata(path)
    assert meta["family"] == "cell" and meta["mode"] == "neighbors" and meta["config"]["agg_neighbors"] == "sum"


def test_tensors_are_the_state_dict_under_reference_keys(tmp_path):
    from safetensors import safe_open

    path = deepspot.save(_model(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(_model().state_dict())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        deepspot.load(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    path = deepspot.save(_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable .safetensors checkpoint"):
        deepspot.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"something": "else"})
    with pytest.raises(CheckpointError, match="not a deepspot checkpoint"):
        deepspot.load(path)


def test_shapes_that_disagree_with_the_config(tmp_path):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["rho.0.model.2.weight"] = torch.zeros(3, 5)
    meta = {"deepspot": json.dumps(deepspot.checkpoint.model_metadata(model))}
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"rho.0.model.2.weight has shape \(3, 5\)"):
        deepspot.load(path)


def test_save_is_atomic_and_refuses_missing_folder(tmp_path):
    with pytest.raises(deepspot.DeepSpotError, match="does not exist"):
        deepspot.save(_model(), tmp_path / "no" / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_default_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = deepspot.save(_model(), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not the private 0600 of the temporary file


def test_load_leaves_the_global_random_state_alone(tmp_path, monkeypatch):
    # Building a model seeds Python, NumPy and torch and sets cuDNN's flags, as the reference does; loading threw the
    # caller's seeds away for weights it replaces at once.
    path = deepspot.save(_model(), tmp_path / "m.safetensors")
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    loaded = deepspot.load(path)
    assert random.getstate() == states[0]
    np.testing.assert_array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])
    assert torch.backends.cudnn.benchmark and "PYTHONHASHSEED" not in os.environ
    for k, v in loaded.state_dict().items():  # the weights are the file's all the same
        assert torch.equal(v, _model().state_dict()[k])


def test_save_refuses_what_is_no_model_and_names_that_are_no_checkpoint(tmp_path):
    with pytest.raises(TypeError, match="a DeepSpot or DeepCell model, not a Linear"):
        deepspot.save(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")
    for name in ("model.onnx", "model.pt"):  # an export's name; a reference file's, which load would import
        with pytest.raises(ValueError, match=f"{name}: a checkpoint is a .safetensors file"):
            deepspot.save(_model(), tmp_path / name)
        assert not (tmp_path / name).exists()
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    with pytest.raises(CheckpointError, match="an exported model, not a checkpoint; run it with deepspot.runtime"):
        deepspot.load(onnx_file)


@pytest.mark.parametrize("name", ["bundle.npz", "pred.h5ad", "tiles.h5"])
def test_a_data_file_given_as_the_model_is_named_as_such(tmp_path, name):
    # `deepspot export bundle.npz` read the bundle as a .safetensors file: "header too large".
    path = tmp_path / name
    np.savez(path, spot=np.zeros((2, 1, 4), np.float32)) if name.endswith(".npz") else path.write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match=rf"{name}: a data file \(\.\w+\), not a model; give a \.safetensors"):
        deepspot.load(path)
