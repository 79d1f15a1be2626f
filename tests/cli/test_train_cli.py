"""``deepspot synth``, ``deepspot train``, ``--version`` and ``--help`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deepspot
from deepspot.cli import app

from _cli import error_line

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
        (["--family", "spot", "--lr", "-1"], "--lr must be a finite number of at least 0, got -1.0"),
        (["--family", "spot", "--lr", "nan"], "--lr must be a finite number of at least 0, got nan"),
        (["--family", "spot", "--weight-decay", "-1"], "--weight-decay must be a finite number of at least 0, got -1"),
        (["--family", "spot", "--weight-decay", "inf"], "--weight-decay must be a finite number of at least 0"),
        (["--family", "spot", "--random-seed", "-1"], "--random-seed must lie in 0..4294967295, got -1"),
        (["--family", "spot", "--min-delta", "nan"], "min_delta must be a finite number of at least 0, got nan"),
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n must be at least 1, got 0"),
        (["--input-size", "-2"], "--input-size must be at least 1, got -2"),
        (["--genes", "0"], "--genes must be at least 1, got 0"),
        (["--subspots", "0"], "--subspots must be at least 1, got 0"),
        (["--neighbors", "0"], "--neighbors must be at least 1, got 0"),
        (["--family", "cell", "--neighbors", "-1"], "--neighbors must be at least 1, got -1"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--n", "100000000", "--input-size", "1048576"], "not enough memory for a bundle of --n 100000000 items"),
    ],
)
def test_synth_refuses_sizes_and_seeds_it_cannot_use(tmp_path, args, message):
    out = tmp_path / "b.npz"
    result = runner.invoke(app, ["synth", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert not out.exists()


def test_synth_and_training_refuse_bad_values_from_python_too():
    from deepspot.errors import ConfigError
    from deepspot.factory import create_model
    from deepspot.data import synth_bundle
    from deepspot.train import fit

    with pytest.raises(ConfigError, match="^n_subspots must be at least 1"):  # the Python argument, not --subspots
        synth_bundle("spot", "subspot", 10, n_subspots=0)
    with pytest.raises(ConfigError, match="random_seed must lie in 0..4294967295"):
        create_model("spot", "spot", input_size=4, output_size=2, random_seed=-1)
    model = create_model("spot", "spot", input_size=4, output_size=2, n_ensemble=1, phi2rho_size=2, lr=float("inf"))
    data = synth_bundle("spot", "spot", 10, input_size=4, genes=2)
    with pytest.raises(ConfigError, match="^lr must be a finite number of at least 0, got inf"):
        fit(model, {"spot": data["spot"]}, data["target"])


@pytest.mark.parametrize("val_fraction, which", [("0.1", "validation"), ("0", "training")])
def test_training_that_diverges_stops_with_an_error_and_writes_nothing(tmp_path, val_fraction, which):
    bundle = tmp_path / "b.npz"
    runner.invoke(app, ["synth", "--n", "300", "--input-size", "16", "--genes", "8", str(bundle)])
    out = tmp_path / "run"
    args = ["train", "--data", str(bundle), "--family", "spot", "-o", str(out), "--no-progress", "--epochs", "3",
            "--n-ensemble", "2", "--phi2rho-size", "16", "--lr", "1e10", "--val-fraction", val_fraction]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert f"training diverged: the {which} loss is " in result.output and " in epoch " in result.output
    assert "try a lower --lr (got 1e+10)" in result.output
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


@pytest.mark.parametrize("extra, message", [
    (["--family", "spot", "--agg-neighbors", "mean"], "--agg-neighbors applies to the cell family only"),
    (["--family", "spot", "--emb-size", "512"], "--emb-size applies to the cell family only"),
    (["--family", "cell", "--val-data", "v.npz", "--val-fraction", "0.2"], "either --val-data or --val-fraction"),
])
def test_train_options_that_would_be_ignored_are_refused(tmp_path, extra, message):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "b.npz"), "-o", str(tmp_path / "run"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, message", [("nan", "validation 'target' holds a non-finite value in row 4"),
                                          ("empty", "the validation data holds no items")])  # fmt: skip
def test_bad_validation_bundle_is_refused_before_training(tmp_path, bad, message):
    import numpy as np

    bundle, val = tmp_path / "b.npz", tmp_path / "v.npz"
    runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "2", str(bundle)])
    arrays = dict(np.load(bundle))
    if bad == "nan":
        arrays["target"][4, 1] = np.nan
    else:
        arrays = {k: v if k == "genes" else v[:0] for k, v in arrays.items()}
    np.savez(val, **arrays)
    out = tmp_path / "run"
    args = ["train", "--data", str(bundle), "--val-data", str(val), "--family", "spot", "--out", str(out),
            "--no-progress", "--n-ensemble", "2", "--phi2rho-size", "4"]  # fmt: skip
    result = runner.invoke(app, args)
    assert "diverged" not in error_line(result, message) and not out.exists()


def test_a_target_that_is_not_numbers_is_one_line(tmp_path):
    import numpy as np

    bundle = tmp_path / "b.npz"
    runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "2", str(bundle)])
    arrays = dict(np.load(bundle))
    arrays["target"] = arrays["target"].astype(str)
    arrays["target"][3, 1] = "n/a"
    np.savez(bundle, **arrays)
    out = tmp_path / "run"
    args = ["train", "--data", str(bundle), "--family", "spot", "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    error_line(result, "'target' must hold numbers")
    assert not out.exists()


def test_a_validation_bundle_of_other_genes_is_refused(tmp_path):
    import numpy as np

    bundle, val = tmp_path / "b.npz", tmp_path / "v.npz"
    runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "3", str(bundle)])
    arrays = dict(np.load(bundle))
    arrays["genes"] = np.array(["gene_0000", "gene_0002", "gene_0001"])  # same count, another order
    np.savez(val, **arrays)
    out = tmp_path / "run"
    args = ["train", "--data", str(bundle), "--val-data", str(val), "--family", "spot", "--out", str(out),
            "--no-progress", "--n-ensemble", "2", "--phi2rho-size", "4"]  # fmt: skip
    result = runner.invoke(app, args)
    error_line(result, "its genes differ from the training bundle's (gene 1: 'gene_0002', not 'gene_0001')")
    assert not out.exists()


def test_val_data_with_the_default_val_fraction_spelled_out_is_refused(tmp_path):
    # --val-fraction 0.1 (the default's value) next to --val-data was silently ignored; any other value was refused.
    bundle = tmp_path / "b.npz"
    runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "2", str(bundle)])
    out = tmp_path / "run"
    args = ["train", "--data", str(bundle), "--val-data", str(bundle), "--val-fraction", "0.1", "--family", "spot",
            "--out", str(out), "--no-progress"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "give either --val-data or --val-fraction, not both" in result.output and not out.exists()


@pytest.mark.parametrize("where", ["plot", "history"])
def test_an_interrupt_while_writing_leaves_the_earlier_run_whole(tmp_path, monkeypatch, where):
    """Training again into a run folder and interrupted while its files are written: the folder keeps the earlier
    model, history and plot together (a new model beside an old history was possible), and no temporary file."""
    import deepspot.train

    bundle, out = tmp_path / "b.npz", tmp_path / "run"
    runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "2", str(bundle)])
    args = ["train", "--data", str(bundle), "--family", "spot", "--out", str(out), "--no-progress", "--epochs", "1",
            "--n-ensemble", "2", "--phi2rho-size", "4"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    if where == "plot":
        monkeypatch.setattr(deepspot.train, "plot_loss", interrupted)
    else:
        monkeypatch.setattr(Path, "write_text", interrupted)  # history.json's write, after the model's
    result = runner.invoke(app, [*args, "--random-seed", "7"])
    assert result.exit_code == 130 and result.output.strip() == "Interrupted.", result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("name", ["bundle", "bundle.npz"])
def test_synth_against_a_file_size_limit_names_the_cause_and_leaves_nothing(tmp_path, name):
    """A bundle folder cut short by a full disk or ``ulimit -f`` said only NumPy's "2880000 requested and 203744
    written" (Python ignores SIGXFSZ, so the write fails instead of killing the process)."""
    import os
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONPATH": str(Path(deepspot.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "deepspot.cli", "synth", "--n", "2000", "--input-size", "16",
                           "--genes", "4", str(tmp_path / name)], capture_output=True, text=True, env=env,
                          preexec_fn=limit, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "File too large" in lines[0] or "file size limit" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_synth_to_an_upper_case_npz_name_writes_a_npz_file(tmp_path):
    """``S.NPZ`` was written as a folder of .npy files, not the .npz file asked for."""
    out = tmp_path / "S.NPZ"
    result = runner.invoke(app, ["synth", "--n", "5", "--input-size", "4", "--genes", "2", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    import numpy as np

    with np.load(out) as z:
        assert z["spot"].shape == (5, 4)


def test_the_progress_bar_stays_off_stdout(tmp_path):
    # stdout is the command's one result line, as a script that pipes it reads it; the bar goes to stderr
    import subprocess
    import sys

    bundle = tmp_path / "b.npz"
    assert runner.invoke(app, ["synth", "--n", "40", "--input-size", "4", "--genes", "2", str(bundle)]).exit_code == 0
    args = ["train", "--data", bundle, "--family", "spot", "--out", tmp_path / "run", "--phi2rho-size", "4",
            "--n-ensemble", "2", "--epochs", "1", "--batch-size", "16"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "deepspot.cli", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trained 1 epoch") and done.stdout.count("\n") == 1, repr(done.stdout)
    infer = ["infer", tmp_path / "run" / "model.safetensors", "-i", bundle, "-o", tmp_path / "p.npy"]
    done = subprocess.run([sys.executable, "-m", "deepspot.cli", *map(str, infer)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote ") and done.stdout.count("\n") == 1, repr(done.stdout)
