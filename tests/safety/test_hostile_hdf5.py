"""HDF5 inputs (``--features-h5``, an ``.h5ad`` given as ``--obs``) read nothing but the file named, and a small file
cannot make a read allocate gigabytes: external links, external storage, virtual datasets and datasets that declare
far more than the file stores are each one line, exit code 2, and nothing written."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from deepspot.cli import app

from _cli import error_line

runner = CliRunner()
SECRET = b"not yours to read, 64 bytes long ........................ secret"


@pytest.fixture()
def obs_csv(tmp_path):
    path = tmp_path / "obs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["barcode", "x_array", "y_array", "x_pixel", "y_pixel"])
        w.writerows([["A", 0, 0, 50, 50], ["B", 0, 2, 50, 150]])
    return path


def _coords(f) -> None:
    c = f.create_dataset("coords", data=np.array([[0, 0], [100, 0]], dtype=np.int64))
    c.attrs["patch_size_level0"] = 100


def _external_storage(f, secret) -> None:
    f.create_dataset("features", shape=(2, 8), dtype="<f4", external=[(str(secret), 0, 64)])


def _external_link(f, secret) -> None:
    with h5py.File(secret.with_suffix(".h5"), "w") as other:
        other["features"] = np.full((2, 8), 7.0, np.float32)
    f["features"] = h5py.ExternalLink(str(secret.with_suffix(".h5")), "/features")


def _virtual(f, secret) -> None:
    layout = h5py.VirtualLayout(shape=(2, 8), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(secret.with_suffix(".h5")), "features", shape=(2, 8))
    with h5py.File(secret.with_suffix(".h5"), "w") as other:
        other["features"] = np.full((2, 8), 7.0, np.float32)
    f.create_virtual_dataset("features", layout)


def _declared_not_stored(f, secret) -> None:
    f.create_dataset("features", shape=(2, 1 << 27), dtype="<f4", chunks=(1, 1 << 20))  # 1 GiB, nothing stored


@pytest.mark.parametrize(
    "make, needle",
    [
        (_external_storage, "takes its data from other files"),
        (_external_link, "is a link to another file"),
        (_virtual, "takes its data from other files"),
        (_declared_not_stored, "declares 1,073,741,824 bytes but the file stores 0"),
    ],
    ids=["external-storage", "external-link", "virtual", "declared-not-stored"],
)
def test_features_h5_reads_only_the_file_named(tmp_path, obs_csv, make, needle):
    secret = tmp_path / "secret" / "key.bin"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    h5 = tmp_path / "slide.h5"
    with h5py.File(h5, "w") as f:
        make(f, secret)
        _coords(f)
    out = tmp_path / "out.npz"
    error_line(runner.invoke(app, ["bundle", "--features-h5", str(h5), "--obs", str(obs_csv), "-o", str(out)]), needle)
    assert not out.exists()


def test_an_h5ad_obs_reads_only_the_file_named(tmp_path):
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    features = tmp_path / "features"
    features.mkdir()
    for b in ("A", "B"):
        np.save(features / f"{b}.npy", np.ones((3, 4), np.float32))
    obs = pd.DataFrame({"x_array": [0.0, 0.0], "y_array": [0.0, 2.0], "x_pixel": [50.0, 50.0],
                        "y_pixel": [50.0, 150.0]}, index=["A", "B"])  # fmt: skip
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET[:16])
    for name, edit, needle in (
        ("storage", lambda f: f["obs"].create_dataset("x_pixel", shape=(2,), dtype="<f8", external=[(str(secret), 0, 16)]),
         "takes its data from other files"),
        ("link", lambda f: f.__setitem__("obs", h5py.ExternalLink(str(tmp_path / "storage.h5ad"), "/obs")),
         "is a link to another file"),
    ):  # fmt: skip
        h5ad = tmp_path / f"{name}.h5ad"
        anndata.AnnData(obs=obs).write_h5ad(h5ad)
        with h5py.File(h5ad, "r+") as f:
            del f["obs/x_pixel" if name == "storage" else "obs"]
            edit(f)
        out = tmp_path / f"{name}.npz"
        error_line(runner.invoke(app, ["bundle", "--features", str(features), "--obs", str(h5ad), "-o", str(out)]),
                   needle)  # fmt: skip
        assert not out.exists()


@pytest.mark.parametrize("chunks", [(2, 1 << 19), (2, 1 << 17)], ids=["one-4-MiB-chunk", "1-MiB-chunks"])
def test_a_compressed_dataset_still_reads(tmp_path, obs_csv, chunks):
    """4 MiB of zeros, gzip-compressed: over the 1 MiB that any dataset may declare, and in 4 MiB chunks over 1024:1
    (deflate's limit is 1032:1), which the first bound of 1024:1 refused as "declares ... but the file stores"."""
    h5 = tmp_path / "slide.h5"
    with h5py.File(h5, "w") as f:
        d = f.create_dataset("features", data=np.zeros((2, 1 << 19), np.float32), compression="gzip",
                             chunks=chunks)  # fmt: skip
        assert d.size * 4 > 1 << 20
        _coords(f)
    out = tmp_path / "out.npz"
    result = runner.invoke(app, ["bundle", "--features-h5", str(h5), "--obs", str(obs_csv), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert np.load(out)["spot"].shape[-1] == 1 << 19
