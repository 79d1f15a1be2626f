"""Hostile model files: nothing in them runs, no small file asks for much memory or time, every refusal is one line.

The files are made by the generators in ``hostile.py``; each test goes through the entry points a user has: the
library (``import_reference``, ``deepspot.load``) and the commands (``import``, ``infer``, ``export``, ``parity``).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import deepspot
from deepspot.cli import app
from deepspot.errors import CheckpointError
from deepspot.importer import import_reference
from deepspot.reference import safe_torch_load

from _cli import error_line

_spec = importlib.util.spec_from_file_location("hostile", Path(__file__).with_name("hostile.py"))
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)

runner = CliRunner()
REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference"
SUFFIXES = (".pkl", ".pt", ".pth", ".ckpt", ".bin")
#: The issue's bound: every hostile file ends in under 2 s.
SECONDS = 2.0


@pytest.fixture()
def bundle(tmp_path) -> Path:
    path = tmp_path / "slide.npz"
    np.savez(path, spot=np.zeros((2, 1, 4), np.float32))
    return path


def _commands(model: Path, bundle: Path, out: Path) -> dict[str, list[str]]:
    return {
        "import": ["import", str(model), "-o", str(out / "m.safetensors")],
        "infer": ["infer", str(model), "-i", str(bundle), "-o", str(out / "p.npy")],
        "export": ["export", str(model), "-o", str(out / "m.onnx")],
        "parity": ["parity", str(model), str(model), "--random", "4"],
    }


# -- code execution ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_torchscript_archives_are_refused_everywhere_and_never_run(tmp_path, bundle, suffix):
    marker = tmp_path / "written-by-the-archive"
    model = hostile.torchscript_payload(tmp_path / f"final_model{suffix}", marker)
    for load in (import_reference, deepspot.load, safe_torch_load):
        with pytest.raises(CheckpointError, match=r"is a TorchScript archive \(torch\.jit\.save\)"):
            load(model)
    out = tmp_path / "out"
    out.mkdir()
    for name, args in _commands(model, bundle, out).items():
        line = error_line(runner.invoke(app, args))
        assert "TorchScript archive" in line, (name, line)
    assert not marker.exists()
    assert list(out.iterdir()) == []


def test_the_torchscript_payload_is_real(tmp_path):
    # The generator's archive does write its marker when torch.jit.load runs it: the refusal above is what stops it.
    marker = tmp_path / "marker"
    model = hostile.torchscript_payload(tmp_path / "model.pt", marker)
    torch.jit.load(str(model))
    assert marker.exists()


# -- denial of service -----------------------------------------------------------------------------------------------
DOS = {
    "stride-0 array in a frozenset": (hostile.stride0_array_set, r"refused to call numpy\.ndarray directly"),
    "stride-0 tensor in an OrderedDict": (hostile.stride0_tensor_ordered_dict, r"refused a tensor of size"),
    "torch.Size of 10**10": (hostile.huge_torch_size, r"refused a tensor of size \(10000000000,\)"),
    "storage larger than the file": (hostile.storage_larger_than_file, r"refused a storage of 1000000000000"),
    "hex codec": (hostile.codecs_hex, r"refused _codecs\.encode with encoding 'hex_codec'"),
    "object array of huge shape": (hostile.object_array_of_huge_shape, r"refused an object array of shape"),
    "zip bomb": (hostile.zip_bomb, r"compressed or larger than the file"),
    "tar with a symlink": (lambda p: hostile.tar_with_symlink(p, p.parent / "fifo"), r"tar archive of torch < 0\.4"),
}


@pytest.mark.parametrize("case", list(DOS))
def test_small_files_cannot_ask_for_memory_or_time(tmp_path, case):
    make, message = DOS[case]
    model = make(tmp_path / "final_model.pkl")
    if case == "tar with a symlink":
        import os

        os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    start = time.perf_counter()
    line = error_line(runner.invoke(app, ["import", str(model), "-o", str(tmp_path / "m.safetensors")]))
    assert time.perf_counter() - start < SECONDS
    assert "final_model.pkl" in line
    assert any(__import__("re").search(message, line) for _ in [0]), line
    assert not (tmp_path / "m.safetensors").exists()


def test_deep_nesting_is_not_a_model(tmp_path):
    model = hostile.deep_nesting(tmp_path / "model.pt")
    line = error_line(runner.invoke(app, ["import", str(model), "-o", str(tmp_path / "m.safetensors")]))
    assert "holds a list" in line


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({"input_size": 10**9}, r"has shape .* the hyperparameters give \(\d+, 1000000000\)"),
        ({"phi2rho_size": 10**9}, r"has shape"),
        ({"n_ensemble": 10**9}, r"n_ensemble=1000000000, but the file holds only \d+ tensors"),
        ({"input_size": "12"}, r"hyperparameter input_size must be an int, got '12'"),
        ({"p": float("nan")}, r"hyperparameter p must be a float"),
        ({"random_seed": [1, 2]}, r"hyperparameter random_seed must be an int, got list"),
    ],
)
def test_hyperparameters_are_checked_against_the_weights_before_building(tmp_path, hparams, message):
    model = hostile.reference_with_hparams(tmp_path / "model.ckpt", REFERENCE / "spot_subspot_neighbors.ckpt", **hparams)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        import_reference(model)
    assert time.perf_counter() - start < SECONDS


def test_a_parameter_with_odd_state_is_read_as_its_tensor(tmp_path):
    weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    weight.odd = __import__("fractions").Fraction(1, 3)  # written with _rebuild_parameter_with_state
    path = tmp_path / "weights.pt"
    torch.save({"w": weight}, path)
    with pytest.raises(CheckpointError, match=r"refused to load global fractions\.Fraction"):
        safe_torch_load(path)
    weight.odd = {"nested": [1, 2]}
    torch.save({"w": weight}, path)
    out = safe_torch_load(path)["w"]
    assert type(out) is torch.Tensor and torch.equal(out, weight.detach()) and not hasattr(out, "odd")


def test_legacy_pickle_format_still_reads(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "t": torch.randn(4, 2).t()}
    path = tmp_path / "old.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    out = safe_torch_load(path)
    assert all(torch.equal(out[k], v) for k, v in state.items())
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:-8])
    with pytest.raises(CheckpointError, match=r"cut\.pt: storage .* is truncated"):
        safe_torch_load(tmp_path / "cut.pt")


def test_a_nan_weight_in_a_reference_file_is_named(tmp_path):
    ckpt = safe_torch_load(REFERENCE / "cell_neighbors_max.ckpt")
    state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    key = next(iter(state))
    state[key].view(-1)[0] = float("nan")
    hparams = {k: v for k, v in dict(ckpt["hyper_parameters"]).items() if k != "scaler"}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=rf"nan\.ckpt: weight {key} holds NaN or infinite values"):
        import_reference(tmp_path / "nan.ckpt")


# -- deepspot checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture()
def checkpoint(tmp_path):
    model = deepspot.create_model("cell", "neighbors", input_size=6, output_size=3, phi2rho_size=4, n_ensemble=2)
    model.genes = ["a", "b", "c"]
    path = deepspot.save(model, tmp_path / "model.safetensors")
    return path


def _rewrite(path: Path, out: Path, edit=None, tensors=None, raw: str | None = None) -> Path:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["deepspot"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    if edit:
        edit(meta)
    if tensors:
        tensors(state)
    save_file(state, str(out), metadata={"deepspot": raw if raw is not None else json.dumps(meta)})
    return out


def _set(path_in_meta, value):
    def edit(meta):
        target = meta
        for key in path_in_meta[:-1]:
            target = target[key]
        target[path_in_meta[-1]] = value

    return edit


CHECKPOINT_CASES = {
    "input_size 10**9": (_set(["config", "input_size"], 10**9), r"has shape \(4, 6\), the hyperparameters give \(4, 1000000000\)"),
    "output_size 10**9": (_set(["config", "output_size"], 10**9), r"has shape"),
    "n_ensemble 10**9": (_set(["config", "n_ensemble"], 10**9), r"n_ensemble=1000000000, but the file holds only"),
    "string input_size": (_set(["config", "input_size"], "6"), r"hyperparameter input_size must be an int, got '6'"),
    "unknown argument": (_set(["config", "evil"], 1), r"unknown hyperparameter 'evil'"),
    "bad format_version": (_set(["format_version"], "1"), r"corrupt deepspot metadata \(format_version '1'\)"),
    "config not a mapping": (_set(["config"], [1, 2]), r"hyperparameters are a list, not a mapping"),
    "unknown family": (_set(["family"], {"x": 1}), r"unknown model family"),
    "genes not a list": (_set(["genes"], "abc"), r"gene names are not a list of strings"),
    "integer genes": (_set(["genes"], [1, 2, 3]), r"gene names are not a list of strings"),
    "scaler arrays": (_set(["scaler"], {"kind": "standard", "offset": [[1]], "scale": None}), r"scaler's offset"),
    "scaler kind": (_set(["scaler"], {"kind": "weird", "offset": [1.0, 2.0, 3.0], "scale": None}), r"unusable scaler"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_crafted_checkpoint_metadata_is_one_line(tmp_path, checkpoint, case):
    edit, message = CHECKPOINT_CASES[case]
    bad = _rewrite(checkpoint, tmp_path / "bad.safetensors", edit)
    start = time.perf_counter()
    line = error_line(runner.invoke(app, ["export", str(bad), "-o", str(tmp_path / "m.onnx")]))
    assert time.perf_counter() - start < SECONDS
    assert __import__("re").search(message, line), line
    assert not (tmp_path / "m.onnx").exists()


def test_deeply_nested_metadata_json(tmp_path, checkpoint):
    bad = _rewrite(checkpoint, tmp_path / "bad.safetensors", raw="[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"corrupt deepspot metadata \(nested too deeply\)"):
        deepspot.load(bad)


def test_a_nan_weight_in_a_checkpoint_is_named(tmp_path, checkpoint):
    def poison(state):
        state["rho.1.model.2.bias"][0] = float("inf")

    bad = _rewrite(checkpoint, tmp_path / "bad.safetensors", tensors=poison)
    line = error_line(runner.invoke(app, ["export", str(bad), "-o", str(tmp_path / "m.onnx")]))
    assert "weight rho.1.model.2.bias holds NaN or infinite values" in line


def test_checkpoint_shapes_are_checked_before_its_tensors_are_read(tmp_path, checkpoint, monkeypatch):
    from safetensors import safe_open

    bad = _rewrite(checkpoint, tmp_path / "bad.safetensors", _set(["config", "phi2rho_size"], 10**6))
    read = []
    real = safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(deepspot.checkpoint, "safe_open", Spy)
    with pytest.raises(CheckpointError, match=r"has shape"):
        deepspot.load(bad)
    assert read == []
