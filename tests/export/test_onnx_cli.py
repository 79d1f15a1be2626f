"""``deepspot export`` and ``deepspot info`` through typer's CliRunner: success, refusals with exit code 2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from deepspot import checkpoint
from deepspot.cli import app
from deepspot.export import exporter as exporter_module
from deepspot.export import read_model_metadata

runner = CliRunner()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def saved(make_model, tmp_path):
    """A tiny spot/neighbors checkpoint in its own folder."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    return checkpoint.save(make_model("spot", "neighbors"), folder / "model.safetensors")


def test_export_and_info(saved, tmp_path):
    output = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(saved), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "spot/neighbors" in result.output
    assert "validation on CPUExecutionProvider passed" in result.output
    # The table says which error its limit bounds: the absolute one, not the relative one printed beside it.
    assert "abs limit" in result.output and "limit bounds max abs" in result.output
    meta = read_model_metadata(output)
    assert meta["mode"] == "neighbors" and meta["source_sha256"] == checkpoint.file_hash(saved)

    info = runner.invoke(app, ["info", str(output)])
    assert info.exit_code == 0, info.output
    assert "spot: float32 (batch, 1, 16)  dynamic axes: 0: batch" in info.output
    assert "neighbors: float32 (batch, n_neighbors, 16)  dynamic axes: 0: batch, 1: n_neighbors" in info.output
    assert "expression: float32 (batch, 5)" in info.output
    assert "mode: neighbors" in info.output and "precision: fp32" in info.output

    as_json = runner.invoke(app, ["info", str(output), "--json"])
    payload = json.loads(as_json.output)
    assert payload["inputs"][1]["shape"] == ["batch", "n_neighbors", 16]
    assert payload["metadata"]["family"] == "spot"


def test_info_on_a_checkpoint_says_what_it_holds(make_model, tmp_path, reference_dir):
    from deepspot.train import TrainConfig, fit

    model = make_model("spot", "neighbors")
    n = 40
    inputs = {"spot": np.ones((n, 16), np.float32), "neighbors": np.ones((n, 3, 16), np.float32)}
    fit(model, inputs, np.zeros((n, 5), np.float32), TrainConfig(epochs=2, batch_size=16, val_fraction=0.25,
                                                                 progress=False))  # fmt: skip
    model.genes = [f"g{i}" for i in range(5)]
    path = checkpoint.save(model, tmp_path / "model.safetensors")
    text = runner.invoke(app, ["info", str(path)])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    params = sum(p.numel() for p in model.parameters())
    assert lines[0] == f"{path}: a deepspot checkpoint, spot/neighbors, {params:,} parameters"
    assert "  genes: 5 genes [g0, g1, g2, g3, g4]" in lines
    assert f"  scaler: {model.scaler.kind} (offset: 5 values, scale: 5 values)" in lines
    assert lines[-1].startswith("  training: 2 epochs, stopped by max_epochs, last train loss ")
    assert "last validation loss" in lines[-1]
    payload = json.loads(runner.invoke(app, ["info", str(path), "--json"]).output)
    assert payload["config"] == dict(model.config) and payload["parameters"] == params
    assert payload["training"]["epochs"] == 2 and payload["genes"] == model.genes
    # a reference file, read as `import` reads it (nothing in it runs)
    ref = runner.invoke(app, ["info", str(reference_dir / "cell_neighbors_max.ckpt"), "--json"])
    assert ref.exit_code == 0, ref.output
    payload = json.loads(ref.output)
    assert (payload["format"], payload["family"], payload["mode"]) == ("reference file", "cell", "neighbors")
    assert payload["scaler"]["kind"] == "standard" and payload["training"] is None
    # an engine is read by `engine info`; a corrupt checkpoint is one line
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    result = runner.invoke(app, ["info", str(plan)])
    assert result.exit_code == 2 and "deepspot engine info" in result.output
    # the folder `deepspot train` writes: the checkpoint in it is named
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and f"pass {path}" in result.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and len(result.output.splitlines()) == 1


def test_export_options_reach_the_graph(saved, tmp_path):
    output = tmp_path / "model.onnx"
    args = [
        "export",
        str(saved),
        "-o",
        str(output),
        "--mode",
        "spot_neighbors",
        "--precision",
        "fp16",
        "--io",
        "fp16",
        "--no-optimize",
        "--fold-scaler",
        "--opset",
        "18",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = read_model_metadata(output)
    assert (meta["precision"], meta["io_dtype"], meta["optimize"], meta["scaler_folded"], meta["opset"]) == (
        "fp16",
        "fp16",
        False,
        True,
        18,
    )


def test_untrained_export_from_constructor_arguments(tmp_path):
    output = tmp_path / "model.onnx"
    args = [
        "export",
        "--family",
        "spot",
        "--mode",
        "subspot_neighbors",
        "--input-size",
        "16",
        "--output-size",
        "5",
        "--phi2rho-size",
        "8",
        "--n-ensemble",
        "3",
        "--random-seed",
        "0",
        "-o",
        str(output),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = read_model_metadata(output)
    assert meta["config"]["random_seed"] == 0 and meta["config"]["n_ensemble"] == 3
    assert meta["mode"] == "subspot_neighbors" and meta["source"] == "in-memory"


def test_wrong_mode_is_refused_naming_the_checkpoints_mode(saved, tmp_path):
    output = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(saved), "--mode", "subspot", "-o", str(output)])
    assert result.exit_code == 2
    assert "mode 'neighbors'" in result.output and "Traceback" not in result.output
    assert _leftovers(tmp_path) == ["ckpt"]


def test_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "absent.safetensors"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "no such checkpoint" in result.output
    assert _leftovers(tmp_path) == []


def test_the_folder_train_writes_names_the_checkpoint_in_it(saved, tmp_path):
    result = runner.invoke(app, ["export", str(saved.parent), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"it is the folder `deepspot train` writes: pass {saved}" in result.output
    assert _leftovers(tmp_path) == ["ckpt"]


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    result = runner.invoke(app, ["export", str(bad), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "bad.safetensors" in result.output and "Traceback" not in result.output
    assert _leftovers(tmp_path) == ["bad.safetensors"]


def test_unwritable_output_folder(saved, tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            # Running as root, permissions do not stop writing: make the folder look unwritable to the exporter.
            real_access = os.access
            monkeypatch.setattr(
                exporter_module.os, "access", lambda p, mode: False if str(p) == str(folder) else real_access(p, mode)
            )
        result = runner.invoke(app, ["export", str(saved), "-o", str(folder / "m.onnx")])
        assert result.exit_code == 2
        assert "not writable" in result.output
        assert _leftovers(folder) == []
    finally:
        folder.chmod(0o700)


def test_missing_output_folder(saved, tmp_path):
    result = runner.invoke(app, ["export", str(saved), "-o", str(tmp_path / "no" / "m.onnx")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "fp64"], "unknown precision"),
        (["--mode", "cells"], "unknown spot mode"),
        (["--family", "spot", "--input-size", "4", "--output-size", "2"], "not both"),
    ],
)
def test_bad_options_exit_2(saved, tmp_path, extra, message):
    result = runner.invoke(app, ["export", str(saved), "-o", str(tmp_path / "m.onnx"), *extra])
    assert result.exit_code == 2 and message in result.output


def test_export_without_a_checkpoint_or_a_family_says_one_is_needed(tmp_path):
    result = runner.invoke(app, ["export", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "give the CHECKPOINT to export, or --family" in result.output and "not both" not in result.output
    assert _leftovers(tmp_path) == []


def test_untrained_export_needs_sizes(tmp_path):
    result = runner.invoke(app, ["export", "--family", "cell", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--input-size and --output-size" in result.output


def test_untrained_export_larger_than_the_memory_is_refused_before_any_work(tmp_path):
    args = ["export", "--family", "spot", "--input-size", "100000000", "--output-size", "100000", "-o",
            str(tmp_path / "u.onnx")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output and result.output.count("\n") == 1
    assert "not enough memory for the weights of a spot model of input_size 100000000" in result.output
    assert _leftovers(tmp_path) == []


def test_fold_scaler_without_scaler_exits_2(tmp_path):
    args = [
        "export",
        "--family",
        "cell",
        "--input-size",
        "8",
        "--output-size",
        "3",
        "--phi2rho-size",
        "4",
        "--fold-scaler",
        "-o",
        str(tmp_path / "m.onnx"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "no scaler" in result.output
    assert _leftovers(tmp_path) == []


def test_info_on_missing_and_corrupt_files(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "absent.onnx")])
    assert result.exit_code == 2 and "no such ONNX file" in result.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 100)
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.output


def test_info_on_an_indexed_export_describes_both_graphs(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "data" / "spot-indexed"
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "an indexed export (deepspot export --layout indexed), two graphs" in result.output
    assert f"encoder: {folder / 'encoder.onnx'}" in result.output and f"head: {folder / 'head.onnx'}" in result.output
    result = runner.invoke(app, ["info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["layout"] == "indexed" and sorted(payload["graphs"]) == ["encoder", "head"]
    assert payload["graphs"]["head"]["metadata"]["role"] == "head"
    # A folder that is not an indexed export, or half of one, is one line naming what is missing.
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "a folder without encoder.onnx and head.onnx, so neither an ONNX file nor an indexed export" in result.output
    (tmp_path / "head.onnx").write_bytes((folder / "head.onnx").read_bytes())
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert "no encoder.onnx; an indexed export holds encoder.onnx and head.onnx" in result.output


@pytest.mark.parametrize("suffix", [".ckpt", ".pkl"])
@pytest.mark.parametrize("name", ["spot_subspot_neighbors", "cell_neighbors_max"])
def test_reference_files_export_with_their_own_mode(reference_dir, run_onnx, tmp_path, name, suffix):
    pytest.importorskip("deepspot.importer", reason="reference files are imported by deepspot.importer")
    output = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(reference_dir / f"{name}{suffix}"), "-o", str(output)])
    assert result.exit_code == 0, result.output
    meta = read_model_metadata(output)
    assert meta["mode_reference"] == name.replace("_max", "") and meta["source"] == f"{name}{suffix}"
    arrays = np.load(reference_dir / f"{name}.npz")
    feed = {k: arrays[k] for k in meta["input_names"]}
    expected = arrays["prediction"]
    assert np.abs(run_onnx(output, feed) - expected).max() <= 1e-5 * (1 + np.abs(expected).max())


@pytest.mark.parametrize("extra, message", [
    (["--input-size", "16"], "--input-size applies to an untrained export (--family) only"),
    (["--random-seed", "7"], "--random-seed applies to an untrained export (--family) only"),
    (["--tensorrt"], "--tensorrt applies to --triton REPO only"),
    (["--max-batch", "64"], "--max-batch applies to --triton REPO only"),
    (["--table-dtype", "fp16"], "--table-dtype applies to --layout indexed only"),
])
def test_options_an_export_would_ignore_are_refused(tmp_path, extra, message):
    import deepspot

    model = deepspot.create_model("cell", "cell", input_size=4, output_size=2, n_ensemble=2, phi2rho_size=3)
    ckpt = deepspot.save(model, tmp_path / "m.safetensors")
    result = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "m.onnx"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "m.onnx").exists()
