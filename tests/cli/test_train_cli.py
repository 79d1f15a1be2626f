"""``deepspot synth``, ``deepspot train``, ``--version`` and ``--help`` as a user runs them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import deepspot
from deepspot.cli import app

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"deepspot {deepspot.__version__}"
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--phi2rho-size", "--n-ensemble", "--p-phi", "--random-seed", "--no-shuffle", "--val-fraction"):
        assert option in result.output


def test_synth_then_train_writes_the_three_files(tmp_path):
    bundle = tmp_path / "b.npz"
    result = runner.invoke(app, ["synth", "--family", "cell", "--n", "120", "--input-size", "6", "--genes", "3",
                                 "--neighbors", "4", str(bundle)])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    args = ["train", "--data", str(bundle), "--family", "cell", "--mode", "neighbors", "--out", str(out),
            "--phi2rho-size", "4", "--n-ensemble", "3", "--epochs", "2", "--batch-size", "32", "--no-progress",
            "--agg-neighbors", "mean", "--random-seed", "11"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "loss.png", "model.safetensors"]
    model = deepspot.load(out / "model.safetensors")
    assert model.family == "cell" and model.config["agg_neighbors"] == "mean" and model.config["random_seed"] == 11
    assert model.scaler is not None and model.genes == ["gene_0000", "gene_0001", "gene_0002"]
    history = json.loads((out / "history.json").read_text())
    assert len(history["train_loss"]) == 2 * history["steps_per_epoch"] and len(history["epoch_val_loss"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--family", "tissue"], "unknown family 'tissue'"),
        (["--family", "spot", "--mode", "everything"], "unknown spot mode 'everything'"),
        (["--family", "cell"], "holds 'spot' features, but the model is a cell model"),
        (["--family", "spot", "--loss-func", "mae"], "unknown spot loss 'mae'"),
        (["--family", "spot", "--batch-size", "0"], "batch_size must be at least 1"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, args, message):
    bundle = tmp_path / "b.npz"
    runner.invoke(app, ["synth", "--n", "20", "--input-size", "4", "--genes", "2", str(bundle)])
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(bundle), "--out", str(out), "--no-progress", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert not out.exists()


def test_missing_bundle(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "x.npz"), "--family", "spot", "--out",
                                 str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 2 and "no such bundle" in result.output


def test_file_system_errors_are_one_line(tmp_path):
    # A folder that cannot be created: the OS's reason, in one line, exit 2.
    target = tmp_path / "file"
    target.write_text("not a folder")
    result = runner.invoke(app, ["quickstart", "--workdir", str(target / "sub")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and "file/sub" in result.output


def test_synth_takes_its_output_as_o_too(tmp_path):
    args = ["synth", "--n", "20", "--input-size", "4", "--genes", "2", "-o", str(tmp_path / "b.npz")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.npz").is_file()
    result = runner.invoke(app, ["synth", "--n", "20", str(tmp_path / "c.npz"), "-o", str(tmp_path / "d.npz")])
    assert result.exit_code == 2 and "give the output bundle once" in result.output
    result = runner.invoke(app, ["synth", "--n", "20"])
    assert result.exit_code == 2 and "give the output bundle once" in result.output
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "d.npz").exists()


def test_no_command_creates_missing_parent_folders(tmp_path):
    # One rule: the output itself is created, a missing parent folder is refused before any work.
    bundle = tmp_path / "b.npz"
    runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "2", str(bundle)])
    missing = tmp_path / "missing"
    cases = [
        ["synth", "--n", "20", "-o", str(missing / "b.npz")],
        ["train", "--data", str(bundle), "--family", "spot", "-o", str(missing / "run"), "--no-progress"],
        ["quickstart", "--workdir", str(missing / "work")],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "does not exist" in result.output and "Traceback" not in result.output, result.output
        assert result.output.strip().count("\n") == 0, result.output
    assert not missing.exists()


def test_train_says_epoch_for_one_epoch(tmp_path):
    bundle = tmp_path / "b.npz"
    runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "2", str(bundle)])
    args = ["train", "--data", str(bundle), "--family", "spot", "-o", str(tmp_path / "run"), "--no-progress",
            "--epochs", "1", "--phi2rho-size", "4", "--n-ensemble", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("trained 1 epoch, "), result.output


def test_quickstart_help_gives_the_time_it_takes():
    result = runner.invoke(app, ["quickstart", "--help"])
    assert result.exit_code == 0 and "about 15 seconds" in result.output and "minute" not in result.output
