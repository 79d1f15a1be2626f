"""AnnData output (what scanpy and squidpy read) and coordinate input from .h5ad or CSV."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from deepspot.anndata_io import model_uns, read_obs, write_anndata
from deepspot.errors import BackendUnavailableError, DeepSpotError, InputError

ad = pytest.importorskip("anndata")


def test_h5ad_carries_names_values_and_metadata(reference_dir, tmp_path):
    import deepspot

    model = deepspot.load(reference_dir / "spot_subspot_neighbors.pkl")
    pred = np.random.default_rng(0).standard_normal((4, 11))  # float64 in, float32 out
    barcodes = ["AAAC-1", "AAAG-1", "AACC-1", "AAGG-1"]
    genes = [f"GENE{j}" for j in range(11)]
    coords = {
        "x_array": np.arange(4),
        "y_array": np.arange(4) * 2,
        "x_pixel": np.arange(4) * 10.0,
        "y_pixel": np.arange(4) * 20.0,
    }
    uns = model_uns(model, inverse_transformed=True, note=None, mixed=[1, "a", None])
    path = write_anndata(tmp_path / "pred.h5ad", pred, barcodes, genes, coords, uns)
    adata = ad.read_h5ad(path)
    assert adata.shape == (4, 11)
    assert adata.obs_names.tolist() == barcodes and adata.var_names.tolist() == genes
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X, pred.astype(np.float32))
    np.testing.assert_array_equal(adata.obs["x_pixel"].to_numpy(), coords["x_pixel"])
    # squidpy's obsm["spatial"] in the reference notebooks' order: [y_pixel, x_pixel].
    np.testing.assert_array_equal(adata.obsm["spatial"], np.column_stack([coords["y_pixel"], coords["x_pixel"]]))
    meta = adata.uns["deepspot"]
    assert meta["family"] == "spot" and meta["mode"] == "subspot_neighbors"
    assert meta["config"]["input_size"] == 24 and "p_phi" not in meta["config"]  # None is dropped
    np.testing.assert_allclose(meta["scaler"]["offset"], model.scaler.offset)
    assert len(meta["history"]["train_loss"]) == 6
    assert bool(adata.uns["inverse_transformed"]) and "note" not in adata.uns
    assert adata.uns["mixed"] == '[1, "a", null]'
    assert not [p for p in tmp_path.iterdir() if p.name != "pred.h5ad"]  # no temporary file left


def test_defaults_and_bad_lengths(tmp_path):
    path = write_anndata(tmp_path / "p.h5ad", np.ones((2, 3), np.float32))
    adata = ad.read_h5ad(path)
    assert adata.obs_names.tolist() == ["0", "1"] and adata.var_names.tolist() == ["gene_0", "gene_1", "gene_2"]
    assert "spatial" not in adata.obsm
    with pytest.raises(InputError, match=r"bad\.h5ad: 1 barcodes for 2 predictions"):
        write_anndata(tmp_path / "bad.h5ad", np.ones((2, 3)), barcodes=["a"])
    with pytest.raises(InputError, match=r"bad\.h5ad: 2 gene names for 3 predicted genes"):
        write_anndata(tmp_path / "bad.h5ad", np.ones((2, 3)), genes=["a", "b"])
    with pytest.raises(InputError, match=r"coordinate 'x_pixel' has shape \(3,\), expected \(2,\)"):
        write_anndata(tmp_path / "bad.h5ad", np.ones((2, 3)), obs_coords={"x_pixel": [1, 2, 3]})
    with pytest.raises(DeepSpotError, match="does not exist"):
        write_anndata(tmp_path / "missing" / "p.h5ad", np.ones((2, 3)))
    assert not (tmp_path / "bad.h5ad").exists()


def _small_h5ad(tmp_path):
    import pandas as pd

    path = tmp_path / "sample.h5ad"
    obs = pd.DataFrame(
        {"x_array": [3, 4], "y_array": [5, 6], "x_pixel": [30.5, 40.5], "other": ["u", "v"]}, index=["b1", "b2"]
    )
    ad.AnnData(X=np.zeros((2, 1), np.float32), obs=obs).write_h5ad(path)
    return path


def test_missing_anndata_gets_a_clear_message(tmp_path, monkeypatch):
    sample = _small_h5ad(tmp_path)
    monkeypatch.setitem(sys.modules, "anndata", None)  # makes `import anndata` raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'deepspot\[anndata\]'"):
        write_anndata(tmp_path / "p.h5ad", np.ones((2, 3)))
    with pytest.raises(BackendUnavailableError, match="needs anndata"):
        read_obs(sample)
    assert not (tmp_path / "p.h5ad").exists()
    # CSV coordinates need no anndata.
    (tmp_path / "c.csv").write_text("barcode,x_array\na,1\n")
    assert read_obs(tmp_path / "c.csv")[0] == ["a"]


def test_read_obs_from_h5ad(tmp_path):
    barcodes, coords = read_obs(_small_h5ad(tmp_path))
    assert barcodes == ["b1", "b2"]
    assert set(coords) == {"x_array", "y_array", "x_pixel"}
    np.testing.assert_array_equal(coords["x_pixel"], [30.5, 40.5])


def test_read_obs_from_csv(tmp_path):
    plain = tmp_path / "coords.csv"
    plain.write_text("barcode,x_array,y_array,x_pixel,y_pixel\nA-1,1,2,10.5,20\nB-1,3,4,30,40\n")
    barcodes, coords = read_obs(plain)
    assert barcodes == ["A-1", "B-1"] and set(coords) == {"x_array", "y_array", "x_pixel", "y_pixel"}
    np.testing.assert_array_equal(coords["x_pixel"], [10.5, 30.0])
    pandas_style = tmp_path / "obs.csv"  # DataFrame.to_csv writes the index under an empty header
    pandas_style.write_text(",x_pixel,y_pixel\nc1,1.0,2.0\nc2,3.0,4.0\n")
    assert read_obs(pandas_style)[0] == ["c1", "c2"]


def test_read_obs_bad_input(tmp_path):
    bad = tmp_path / "coords.csv"
    bad.write_text("id,x_array\nA,1\n")
    with pytest.raises(InputError, match=r"coords\.csv: no barcode column \(columns: id, x_array\)"):
        read_obs(bad)
    bad.write_text("barcode,x_array\nA,one\n")
    with pytest.raises(InputError, match=r"coords\.csv: line 2: column 'x_array' holds 'one', which is not a number"):
        read_obs(bad)
    bad.write_text("barcode,x_array\nA,1,2\n")
    with pytest.raises(InputError, match=r"coords\.csv: line 2 has 3 fields"):
        read_obs(bad)
    bad.write_text("barcode,x_array\n")
    with pytest.raises(InputError, match="holds no barcodes"):
        read_obs(bad)
    with pytest.raises(InputError, match="unknown coordinates format"):
        read_obs(bad.rename(tmp_path / "coords.json"))
    with pytest.raises(InputError, match="no such coordinates file"):
        read_obs(tmp_path / "absent.csv")
    not_h5 = tmp_path / "x.h5ad"
    not_h5.write_text("nope")
    with pytest.raises(InputError, match=r"x\.h5ad: not a readable \.h5ad file"):
        read_obs(not_h5)


# -- barcodes: identifiers, taken verbatim from a CSV as from an .h5ad ---------------------------------------------
def test_csv_barcodes_are_verbatim_as_pandas_and_anndata_read_them(tmp_path):
    import pandas as pd

    path = tmp_path / "coords.csv"  # written as "a, b": the spaces after the commas belong to the fields
    path.write_text("barcode, x_array, y_array\n A-1 , 1, 2\nB 1,3, 4\n")
    barcodes, coords = read_obs(path)
    assert barcodes == [" A-1 ", "B 1"]
    assert barcodes == list(pd.read_csv(path, dtype=str)["barcode"])  # pandas keeps them too (skipinitialspace=False)
    read_csv = ad.io.read_csv if hasattr(ad, "io") and hasattr(ad.io, "read_csv") else ad.read_csv
    assert barcodes == list(read_csv(path, first_column_names=True).obs_names)
    np.testing.assert_array_equal(coords["x_array"], [1.0, 3.0])  # names and numbers read as before
    np.testing.assert_array_equal(coords["y_array"], [2.0, 4.0])


def test_csv_and_h5ad_of_one_table_give_the_same_barcodes(tmp_path):
    import pandas as pd

    names = [" lead", "trail ", "in side", "plain", "  two"]
    obs = pd.DataFrame({"x_pixel": np.arange(5.0), "y_pixel": np.arange(5.0) * 2,
                        "sampleID": [" s1", " s1", "s 2", "s 2", "s 2"]}, index=pd.Index(names, name="cell_id"))  # fmt: skip
    obs.to_csv(tmp_path / "obs.csv")  # the index under its name, cell_id, as Xenium's cells.csv names it
    obs.rename_axis(None).to_csv(tmp_path / "unnamed.csv")  # the index under an empty name
    ad.AnnData(X=np.zeros((5, 1), np.float32), obs=obs).write_h5ad(tmp_path / "obs.h5ad")
    results = [read_obs(tmp_path / f, extra=("sampleID",)) for f in ("obs.csv", "unnamed.csv", "obs.h5ad")]
    for barcodes, columns in results:
        assert barcodes == names
        assert [str(s) for s in columns["sampleID"]] == [" s1", " s1", "s 2", "s 2", "s 2"]
        np.testing.assert_array_equal(columns["y_pixel"], np.arange(5.0) * 2)


@pytest.mark.parametrize("header,rows", [
    ("barcode,cell_id,x_array", ["A,A,1", "B,C,2"]),
    (",Unnamed: 0,x_array", ["0,A,1", "1,B,2"]),  # pandas' index written again after read_csv without index_col
])  # fmt: skip
def test_two_barcode_columns_that_disagree_are_one_error(tmp_path, header, rows):
    path = tmp_path / "coords.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(InputError, match=r"coords\.csv: columns .* both name the barcodes but disagree at line \d "
                                         r"\('.*' and '.*'\); keep one"):  # fmt: skip
        read_obs(path)


def test_barcode_column_names(tmp_path):
    path = tmp_path / "coords.csv"
    path.write_text("cell_id,x_centroid,x_pixel\naaab-1,1,2\n")  # Xenium's cells.csv names it cell_id
    assert read_obs(path)[0] == ["aaab-1"]
    path.write_text("x_pixel,barcode,cell_id\n2,A,A\n3,B,B\n")  # two that agree: not ambiguous
    assert read_obs(path)[0] == ["A", "B"]
    path.write_text("x_pixel,barcode\n2,A\n3,\n")
    with pytest.raises(InputError, match=r"coords\.csv: line 3: the barcode \('barcode'\) is empty"):
        read_obs(path)
    path.write_text("id,x_pixel\nA,2\n")  # never "the first column" by position
    with pytest.raises(InputError, match=r"no barcode column \(columns: id, x_pixel\); name it one of 'barcode'"):
        read_obs(path)


@pytest.mark.parametrize("text", [
    ",barcode,x_pixel\n0,A-1,1\n1,B-1,2\n",  # DataFrame.to_csv with its default RangeIndex beside the barcodes
    "barcode,x_pixel,\nA-1,1,\nB-1,2,\n",  # a trailing comma on every line: an empty column with an empty name
])  # fmt: skip
def test_a_named_barcode_column_comes_before_an_unnamed_one(tmp_path, text):
    path = tmp_path / "coords.csv"
    path.write_text(text)
    assert read_obs(path)[0] == ["A-1", "B-1"]
