"""``deepspot import`` and ``deepspot bundle`` as a user runs them: results, one-line errors, exit code 2."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import deepspot
from deepspot.cli import app
from deepspot.data import load_bundle
from deepspot.reference import safe_torch_load

from _cli import error_line

runner = CliRunner()
NAMES = ("spot_subspot_neighbors", "cell_neighbors_max")


def test_help_lists_the_options():
    result = runner.invoke(app, ["import", "--help"])
    assert result.exit_code == 0 and "--hparams" in result.output and "--genes" in result.output
    result = runner.invoke(app, ["bundle", "--help"])
    assert result.exit_code == 0
    for option in ("--features", "--obs", "--family", "--radius", "--k", "--index", "--dense", "--max-neighbors"):
        assert option in result.output


@pytest.mark.parametrize("suffix", [".pkl", ".ckpt"])
@pytest.mark.parametrize("name", NAMES)
def test_import_writes_a_checkpoint_equal_to_the_reference(reference_dir, tmp_path, ref, name, suffix):
    out = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["import", str(reference_dir / f"{name}{suffix}"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "standard scaler" in result.output and str(out) in result.output
    model = deepspot.load(out)
    case = ref.case(name)
    pred = ref.predict(model, case)
    assert ref.max_abs(pred, case["prediction"]) <= ref.tol
    assert ref.max_abs(model.inverse_transform(pred), case["prediction_inverse"]) <= ref.tol


def test_import_state_dict_with_hparams(reference_dir, tmp_path, ref):
    ckpt = safe_torch_load(reference_dir / "cell_neighbors_max.ckpt")
    weights = tmp_path / "sub" / "weights.pt"
    weights.parent.mkdir()
    torch.save(dict(ckpt["state_dict"]), weights)
    out = tmp_path / "m.safetensors"
    # No YAML beside the weights: a clear error, nothing written.
    result = runner.invoke(app, ["import", str(weights), "-o", str(out)])
    assert result.exit_code == 2 and "holds no hyperparameters" in error_line(result) and not out.exists()
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(f"G{i}" for i in range(6)) + "\n")
    args = ["import", str(weights), "--hparams", str(reference_dir / "cell_neighbors_max.yaml"), "--genes", str(genes)]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = deepspot.load(out)
    assert model.genes == [f"G{i}" for i in range(6)] and model.scaler is None
    case = ref.case("cell_neighbors_max")
    assert ref.max_abs(ref.predict(model, case), case["prediction"]) <= ref.tol


class _Shell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_import_bad_input_exits_2_and_writes_nothing(reference_dir, tmp_path):
    out = tmp_path / "model.safetensors"
    marker = tmp_path / "pwned"
    evil = tmp_path / "final_model.pkl"
    evil.write_bytes(pickle.dumps(_Shell(marker), protocol=2))
    result = runner.invoke(app, ["import", str(evil), "-o", str(out)])
    line = error_line(result)
    assert result.exit_code == 2 and "refused to load global" in line and "final_model.pkl" in line
    assert not marker.exists() and not out.exists()

    yaml_path = tmp_path / "wrong.yaml"
    pkl = reference_dir / "spot_subspot_neighbors.pkl"
    hparams = (reference_dir / "spot_subspot_neighbors.yaml").read_text()
    yaml_path.write_text(hparams.replace("input_size: 24", "input_size: 7"))
    result = runner.invoke(app, ["import", str(pkl), "--hparams", str(yaml_path), "-o", str(out)])
    line = error_line(result)
    assert result.exit_code == 2 and "spot_subspot_neighbors.pkl" in line and "has shape" in line and not out.exists()

    result = runner.invoke(app, ["import", str(pkl), "-o", str(tmp_path / "m.pt")])
    assert result.exit_code == 2 and "must end in .safetensors" in error_line(result)
    assert set(tmp_path.iterdir()) == {evil, yaml_path}


def _reference_folder(tmp_path, n_side=3, d=5, rows=4):
    rng = np.random.default_rng(0)
    barcodes = [f"S{i}" for i in range(n_side * n_side)]
    xs, ys = np.divmod(np.arange(n_side * n_side), n_side)
    folder = tmp_path / "features"
    folder.mkdir()
    for b in barcodes:
        np.save(folder / f"{b}.npy", rng.standard_normal((rows, d)).astype(np.float32))
    lines = ["barcode,x_array,y_array,x_pixel,y_pixel"] + [
        f"{b},{x},{y},{x * 100.0},{y * 100.0}" for b, x, y in zip(barcodes, xs, ys)
    ]
    (tmp_path / "coords.csv").write_text("\n".join(lines) + "\n")
    return folder, tmp_path / "coords.csv", barcodes


def test_bundle_dense_and_indexed(tmp_path):
    folder, csv, barcodes = _reference_folder(tmp_path)
    out = tmp_path / "dense.npz"
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(csv), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "9 spots, 5 features, 3 sub-spots, 8 neighbour rows (dense)" in result.output
    dense = load_bundle(out)
    assert dense["neighbors"].shape == (9, 8, 5) and dense.barcodes == barcodes
    out2 = tmp_path / "indexed"
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(csv), "-o", str(out2), "--index",
                                 "--max-neighbors", "10"])  # fmt: skip
    assert result.exit_code == 0, result.output
    indexed = load_bundle(out2)
    assert indexed.layout == "indexed" and indexed["neighbor_index"].shape == (9, 10)
    assert indexed["neighbor_index"][0].tolist() == [1, 3, 4] + [-1] * 7  # corner spot (0, 0), in obs order


def test_bundle_cells_with_k(tmp_path):
    folder, csv, _ = _reference_folder(tmp_path, rows=1)
    out = tmp_path / "cells.npz"
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(csv), "-o", str(out),
                                 "--family", "cell", "--k", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    bundle = load_bundle(out)
    assert bundle["cell"].shape == (9, 1, 5) and bundle["neighbors"].shape == (9, 3, 5)


def test_bundle_bad_input_exits_2_and_writes_nothing(tmp_path):
    folder, csv, barcodes = _reference_folder(tmp_path)
    out = tmp_path / "out.npz"
    (folder / f"{barcodes[4]}.npy").unlink()
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(csv), "-o", str(out)])
    assert result.exit_code == 2 and f"'{barcodes[4]}'" in error_line(result) and not out.exists()
    np.save(folder / f"{barcodes[4]}.npy", np.zeros((4, 6), np.float32))
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(csv), "-o", str(out)])
    assert result.exit_code == 2 and f"{barcodes[4]}.npy" in error_line(result) and not out.exists()
    shutil.rmtree(folder)
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(csv), "-o", str(out)])
    assert result.exit_code == 2 and "no such features folder" in error_line(result) and not out.exists()
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(csv), "-o", str(out),
                                 "--family", "tile"])  # fmt: skip
    assert result.exit_code == 2 and "unknown family" in error_line(result)


def test_files_that_are_not_reference_files(tmp_path):
    """A deepspot checkpoint and random bytes given to ``import`` are one-line errors, never tracebacks."""
    ckpt = deepspot.save(deepspot.create_model("cell", "cell", input_size=4, output_size=2, n_ensemble=2,
                                               phi2rho_size=3), tmp_path / "m.safetensors")  # fmt: skip
    (tmp_path / "noise.pkl").write_bytes(bytes(range(256)) * 3)
    for source, message in ((ckpt, "is not a reference file"), (tmp_path / "noise.pkl", "not a readable torch file")):
        out = tmp_path / "out.safetensors"
        result = runner.invoke(app, ["import", str(source), "-o", str(out)])
        assert result.exit_code == 2 and message in error_line(result)
        assert "Traceback" not in result.output and not out.exists()


def test_barcodes_with_spaces_reach_the_predictions_unchanged_from_a_csv_or_an_h5ad(reference_dir, tmp_path):
    """A CSV's barcodes were stripped of surrounding spaces and an .h5ad's were not: the same table gave two bundles,
    and a barcode " c0" read from a CSV looked for c0.npy."""
    ad = pytest.importorskip("anndata")
    import pandas as pd

    rng = np.random.default_rng(0)
    names = [" c0", "c1 ", "c 2", "c3", "  c4  ", "c5"]
    folder = tmp_path / "features"
    folder.mkdir()
    for b in names:
        np.save(folder / f"{b}.npy", rng.standard_normal(12).astype(np.float32))  # the reference cell model: 12
    obs = pd.DataFrame({"x_pixel": rng.uniform(0, 100, 6), "y_pixel": rng.uniform(0, 100, 6)},
                       index=pd.Index(names, name="cell_id"))  # fmt: skip
    obs.to_csv(tmp_path / "cells.csv")
    ad.AnnData(X=np.zeros((6, 1), np.float32), obs=obs).write_h5ad(tmp_path / "cells.h5ad")
    bundles = {}
    for source in ("cells.csv", "cells.h5ad"):
        out = tmp_path / f"{source}.npz"
        result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(tmp_path / source), "-o",
                                     str(out), "--family", "cell", "--k", "4"])  # fmt: skip
        assert result.exit_code == 0, result.output
        bundles[source] = load_bundle(out)
        assert bundles[source].barcodes == names
        pred = tmp_path / f"{source}.h5ad"
        result = runner.invoke(app, ["infer", str(reference_dir / "cell_neighbors_max.pkl"), "-i", str(out),
                                     "-o", str(pred)])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert list(ad.read_h5ad(pred).obs_names) == names
    for key in bundles["cells.csv"].arrays:
        np.testing.assert_array_equal(bundles["cells.csv"][key], bundles["cells.h5ad"][key])
    # A CSV written as "a, b": " c1" is another barcode than "c1", and the error says why its file is not found.
    (tmp_path / "spaced.csv").write_text("x_pixel, y_pixel, cell_id\n" + "".join(
        f"{x}, {y}, {b.strip()}\n" for b, x, y in zip(names, obs["x_pixel"], obs["y_pixel"])))  # fmt: skip
    result = runner.invoke(app, ["bundle", "--features", str(folder), "--obs", str(tmp_path / "spaced.csv"), "-o",
                                 str(tmp_path / "spaced.npz"), "--family", "cell", "--k", "4"])  # fmt: skip
    line = error_line(result)
    assert result.exit_code == 2 and "no features file for barcode(s) ' c1', ' c 2', ' c3' and 2 more" in line, line
    assert "'c 2.npy' exists, but barcodes are taken verbatim and ' c 2' has spaces around it" in line, line
    assert not (tmp_path / "spaced.npz").exists()


@pytest.mark.parametrize("name", ["bundle", "bundle.npz"])
def test_bundle_against_a_file_size_limit_names_the_cause_and_leaves_nothing(tmp_path, name):
    """The dense bags are written a block at a time: a write the disk stops is one line naming the bundle and the
    array, exit 2, and no partial output."""
    import resource
    import subprocess
    import sys

    folder, csv, _ = _reference_folder(tmp_path, n_side=5, d=200)
    out = tmp_path / "out"
    out.mkdir()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(deepspot.__file__)))}
    proc = subprocess.run([sys.executable, "-m", "deepspot.cli", "bundle", "--features", str(folder), "--obs", str(csv),
                           "-o", str(out / name)], capture_output=True, text=True, env=env, preexec_fn=limit,
                          timeout=120)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{out / name}: the write stopped (File too large) while writing " in lines[0], lines[0]
    assert "file size limit (ulimit -f)" in lines[0], lines[0]
    assert list(out.iterdir()) == []
