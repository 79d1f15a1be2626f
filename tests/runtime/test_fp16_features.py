"""fp16 features end to end: ``synth`` / ``bundle --dtype fp16``, an ``--io fp16`` graph, parity with fp32."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from deepspot.cli import app
from deepspot.data import cast_features, load_bundle
from deepspot.errors import InputError
from deepspot.runtime import TOLERANCES

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_fp16_features_through_an_fp16_graph_stay_within_the_fp16_tolerance(tmp_path):
    run("synth", "--family", "cell", "--mode", "neighbors", "--n", "200", "--input-size", "24", "--genes", "6",
        "-o", tmp_path / "f32.npz")  # fmt: skip
    run("synth", "--family", "cell", "--mode", "neighbors", "--n", "200", "--input-size", "24", "--genes", "6",
        "--dtype", "fp16", "-o", tmp_path / "f16.npz")  # fmt: skip
    f32, f16 = load_bundle(tmp_path / "f32.npz"), load_bundle(tmp_path / "f16.npz")
    assert f32["neighbors"].dtype == np.float32
    assert f16["neighbors"].dtype == np.float16 and f16["target"].dtype == np.float32
    assert (tmp_path / "f16.npz").stat().st_size < 0.6 * (tmp_path / "f32.npz").stat().st_size
    run("train", "--data", tmp_path / "f32.npz", "--family", "cell", "--mode", "neighbors", "--epochs", "1",
        "--n-ensemble", "3", "--no-progress", "-o", tmp_path / "run")  # fmt: skip
    ckpt = tmp_path / "run" / "model.safetensors"
    run("export", ckpt, "--io", "fp16", "--precision", "fp16", "-o", tmp_path / "m16.onnx")
    run("infer", tmp_path / "m16.onnx", "-i", tmp_path / "f16.npz", "-o", tmp_path / "p16.npy")
    run("infer", ckpt, "-i", tmp_path / "f32.npz", "-o", tmp_path / "p32.npy")  # eager fp32, fp32 features
    p16, p32 = np.load(tmp_path / "p16.npy"), np.load(tmp_path / "p32.npy")
    tol = TOLERANCES["fp16"]
    assert np.abs(p16 - p32).max() <= tol.atol + tol.rtol * np.abs(p32).max()
    # An fp32 graph takes fp16 features too (each batch is cast).
    run("infer", ckpt, "-i", tmp_path / "f16.npz", "-o", tmp_path / "p32from16.npy")
    assert np.abs(np.load(tmp_path / "p32from16.npy") - p32).max() <= tol.atol + tol.rtol * np.abs(p32).max()


def test_values_beyond_fp16_range_are_refused():
    with pytest.raises(InputError, match="beyond float16's range"):
        cast_features({"spot": np.array([[1e5]], np.float32)}, "fp16")
    with pytest.raises(InputError, match="unknown feature dtype 'int8'"):
        cast_features({}, "int8")
