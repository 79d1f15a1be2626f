"""The reference's feature layout -> bundle: neighbours, padding and order as the reference's data loaders make them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepspot.data import load_bundle
from deepspot.errors import DeepSpotError, InputError
from deepspot.layout import (
    build_bundle,
    cell_neighbor_index,
    gather_neighbors,
    pad_neighbor_lists,
    spot_neighbor_lists,
    write_bundle,
)


def write_features(folder, barcodes, rows, d, rng):
    """One ``<barcode>.npy`` per item, ``(rows, D)`` (``rows=None``: a 1-D cell vector); returns them by barcode."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for b in barcodes:
        x = rng.standard_normal(d if rows is None else (rows, d)).astype(np.float32)
        np.save(folder / f"{b}.npy", x)
        out[b] = x
    return out


def write_csv(path, barcodes, coords):
    names = list(coords)
    lines = [",".join(["barcode", *names])]
    lines += [",".join([b, *(repr(float(coords[n][i])) for n in names)]) for i, b in enumerate(barcodes)]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_spot_neighbors(barcodes, x, y, radius):
    """The reference's rule, spelled out: other spots with |dx| <= r and |dy| <= r, in obs order."""
    out = []
    for i, b in enumerate(barcodes):
        out.append(
            [j for j, c in enumerate(barcodes) if abs(x[j] - x[i]) <= radius and abs(y[j] - y[i]) <= radius and c != b]
        )
    return out


def spot_grid():
    """A 4x3 grid of spots, a lone spot far away, listed out of grid order."""
    xs, ys = np.meshgrid(np.arange(4), np.arange(3), indexing="ij")
    x = np.concatenate([xs.ravel(), [20]]).astype(float)
    y = np.concatenate([ys.ravel(), [20]]).astype(float)
    order = np.random.default_rng(1).permutation(len(x))
    barcodes = [f"AAAC-{i:02d}" for i in range(len(x))]
    return barcodes, x[order], y[order]


@pytest.mark.parametrize("radius", [0.5, 1, 1.5, 2])
def test_spot_neighbors_match_the_reference_rule(radius):
    barcodes, x, y = spot_grid()
    flat, counts = spot_neighbor_lists(x, y, radius)
    expected = reference_spot_neighbors(barcodes, x, y, radius)
    assert counts.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [j for e in expected for j in e]


def test_spot_bundle_neighbours_padding_and_order(tmp_path):
    rng = np.random.default_rng(0)
    barcodes, x, y = spot_grid()
    feats = write_features(tmp_path / "features", barcodes, rows=1 + 4, d=6, rng=rng)
    arrays = build_bundle(tmp_path / "features", barcodes, {"x_array": x, "y_array": y}, "spot", radius=1)
    n = len(barcodes)
    expected = reference_spot_neighbors(barcodes, x, y, 1)
    k = max(len(e) for e in expected)
    assert k == 8  # an inner grid spot sees its 8 surrounding spots
    assert arrays["spot"].shape == (n, 1, 6) and arrays["subspot"].shape == (n, 4, 6)
    assert arrays["neighbors"].shape == (n, k, 6) and arrays["neighbors"].dtype == np.float32
    for i, b in enumerate(barcodes):
        np.testing.assert_array_equal(arrays["spot"][i, 0], feats[b][0])
        np.testing.assert_array_equal(arrays["subspot"][i], feats[b][1:])
        # Neighbours in obs order, each by its own tile (row 0), then zero rows up to the largest bag.
        want = np.zeros((k, 6), np.float32)
        for r, j in enumerate(expected[i]):
            want[r] = feats[barcodes[j]][0]
        np.testing.assert_array_equal(arrays["neighbors"][i], want)
    lone = barcodes[int(np.argmax(x))]
    assert not arrays["neighbors"][barcodes.index(lone)].any()  # no neighbours: all zero rows
    assert arrays["barcode"].tolist() == barcodes
    np.testing.assert_array_equal(arrays["x_array"], x)


def test_indexed_layout_equals_the_dense_one(tmp_path):
    rng = np.random.default_rng(0)
    barcodes, x, y = spot_grid()
    write_features(tmp_path / "f", barcodes, rows=3, d=4, rng=rng)
    coords = {"x_array": x, "y_array": y}
    dense = build_bundle(tmp_path / "f", barcodes, coords, radius=1)
    indexed = build_bundle(tmp_path / "f", barcodes, coords, radius=1, index=True)
    idx = indexed["neighbor_index"]
    assert "neighbors" not in indexed and idx.dtype == np.int64 and idx.shape == dense["neighbors"].shape[:2]
    expected = reference_spot_neighbors(barcodes, x, y, 1)
    for i, e in enumerate(expected):
        assert idx[i].tolist() == e + [-1] * (idx.shape[1] - len(e))
    np.testing.assert_array_equal(gather_neighbors(indexed["spot"], idx), dense["neighbors"])


def test_a_spot_without_neighbours_still_gets_one_zero_row(tmp_path):
    # The reference counts an empty neighbour list as one, so even a slide of lone spots has one zero row.
    rng = np.random.default_rng(0)
    barcodes = ["a", "b", "c"]
    write_features(tmp_path / "f", barcodes, rows=1, d=3, rng=rng)
    arrays = build_bundle(tmp_path / "f", barcodes, {"x_array": [0, 10, 20], "y_array": [0, 0, 0]}, radius=1)
    assert arrays["neighbors"].shape == (3, 1, 3) and not arrays["neighbors"].any()
    assert "subspot" not in arrays  # one row per file: the spot alone
    assert pad_neighbor_lists(np.zeros(0, np.int64), np.zeros(3, np.int64)).tolist() == [[-1], [-1], [-1]]


def test_max_neighbors_pads_to_the_data_set_width(tmp_path):
    rng = np.random.default_rng(0)
    barcodes, x, y = spot_grid()
    write_features(tmp_path / "f", barcodes, rows=1, d=2, rng=rng)
    coords = {"x_array": x, "y_array": y}
    wide = build_bundle(tmp_path / "f", barcodes, coords, radius=1, max_neighbors=11, index=True)
    assert wide["neighbor_index"].shape == (len(barcodes), 11)
    with pytest.raises(InputError, match=r"has 8 neighbours within radius 1, more than max_neighbors=5$"):
        build_bundle(tmp_path / "f", barcodes, coords, radius=1, max_neighbors=5)


def test_cell_neighbors_are_the_k_nearest_less_the_cell_itself():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 1000, size=(60, 2))
    idx = cell_neighbor_index(pts[:, 0], pts[:, 1], k=6)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    expected = np.argsort(d, axis=1, kind="stable")[:, :6]
    assert (expected[:, 0] == np.arange(60)).all()
    np.testing.assert_array_equal(idx, expected[:, 1:])  # nearest first, 5 = k - 1 neighbours


def test_cell_duplicates_and_small_slides():
    # Two cells at one position: each keeps the other and drops itself, wherever the tree put it.
    idx = cell_neighbor_index(np.array([0.0, 0.0, 5.0]), np.array([0.0, 0.0, 0.0]), k=3)
    assert sorted(idx[0].tolist()) == [1, 2] and sorted(idx[1].tolist()) == [0, 2]
    assert idx[2].tolist() == [0, 1] or idx[2].tolist() == [1, 0]
    # Fewer cells than k: the missing neighbours are padding.
    idx = cell_neighbor_index(np.array([0.0, 1.0]), np.array([0.0, 0.0]), k=45)
    assert idx.shape == (2, 44) and idx[0, 0] == 1 and idx[1, 0] == 0 and (idx[:, 1:] == -1).all()


def test_cell_bundle_from_an_h5ad(tmp_path):
    ad = pytest.importorskip("anndata")
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 30
    barcodes = [f"cell{i}" for i in range(n)]
    feats = write_features(tmp_path / "features", barcodes[: n // 2], rows=None, d=5, rng=rng)  # (D,) files
    feats.update(write_features(tmp_path / "features", barcodes[n // 2 :], rows=1, d=5, rng=rng))  # (1, D) files
    pix = rng.uniform(0, 500, size=(n, 2))
    obs = pd.DataFrame({"x_pixel": pix[:, 0], "y_pixel": pix[:, 1]}, index=barcodes)
    ad.AnnData(X=np.zeros((n, 2), np.float32), obs=obs).write_h5ad(tmp_path / "sample.h5ad")
    arrays = write_bundle(tmp_path / "b.npz", tmp_path / "features", tmp_path / "sample.h5ad", "cell", k=8)
    bundle = load_bundle(tmp_path / "b.npz")
    assert bundle["cell"].shape == (n, 1, 5) and bundle["neighbors"].shape == (n, 7, 5)
    idx = cell_neighbor_index(pix[:, 0], pix[:, 1], 8)
    for i, b in enumerate(barcodes):
        np.testing.assert_array_equal(bundle["cell"][i, 0], feats[b].reshape(-1))
        for r, j in enumerate(idx[i]):
            np.testing.assert_array_equal(bundle["neighbors"][i, r], feats[barcodes[j]].reshape(-1))
    assert bundle.barcodes == barcodes and "x_array" not in bundle
    assert set(arrays) == {"cell", "neighbors", "barcode", "x_pixel", "y_pixel"}


def test_bundle_feeds_an_imported_reference_model(reference_dir, tmp_path):
    import deepspot

    model = deepspot.load(reference_dir / "spot_subspot_neighbors.pkl")  # input_size 24
    rng = np.random.default_rng(0)
    barcodes, x, y = spot_grid()
    write_features(tmp_path / "f", barcodes, rows=1 + 9, d=24, rng=rng)
    coords = {"x_array": x, "y_array": y, "x_pixel": x * 100, "y_pixel": y * 100}
    csv = write_csv(tmp_path / "coords.csv", barcodes, coords)
    write_bundle(tmp_path / "bundle", tmp_path / "f", csv, "spot", radius=1)
    bundle = load_bundle(tmp_path / "bundle")
    mode = bundle.validate("spot", model.mode, input_size=model.input_size)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.array(v)) for k, v in bundle.inputs(mode).items()})
    assert out.shape == (len(barcodes), 11) and torch.isfinite(out).all()


# -- bad input ----------------------------------------------------------------------------------------------------
def test_missing_barcode_is_named_and_nothing_written(tmp_path):
    rng = np.random.default_rng(0)
    barcodes, x, y = spot_grid()
    write_features(tmp_path / "f", barcodes[:-2], rows=2, d=3, rng=rng)
    csv = write_csv(tmp_path / "coords.csv", barcodes, {"x_array": x, "y_array": y})
    with pytest.raises(InputError, match=rf"no features file for barcode\(s\) '{barcodes[-2]}', '{barcodes[-1]}'"):
        write_bundle(tmp_path / "out.npz", tmp_path / "f", csv)
    assert not (tmp_path / "out.npz").exists()


def test_inconsistent_feature_sizes_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    barcodes, x, y = spot_grid()
    write_features(tmp_path / "f", barcodes, rows=3, d=4, rng=rng)
    np.save(tmp_path / "f" / f"{barcodes[5]}.npy", np.zeros((3, 5), np.float32))
    csv = write_csv(tmp_path / "coords.csv", barcodes, {"x_array": x, "y_array": y})
    with pytest.raises(InputError, match=rf"{barcodes[5]}\.npy: features of shape \(3, 5\), but .* has \(3, 4\)"):
        write_bundle(tmp_path / "out", tmp_path / "f", csv)
    np.save(tmp_path / "f" / f"{barcodes[5]}.npy", np.zeros((2, 4), np.float32))  # one sub-spot fewer
    with pytest.raises(InputError, match=rf"{barcodes[5]}\.npy: features of shape \(2, 4\)"):
        write_bundle(tmp_path / "out", tmp_path / "f", csv)
    (tmp_path / "f" / f"{barcodes[5]}.npy").write_bytes(b"garbage")
    with pytest.raises(InputError, match=rf"{barcodes[5]}\.npy: not a readable \.npy file"):
        write_bundle(tmp_path / "out", tmp_path / "f", csv)
    assert not (tmp_path / "out").exists()


def test_other_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    write_features(tmp_path / "f", ["a", "b"], rows=1, d=3, rng=rng)
    with pytest.raises(InputError, match="barcode 'a' appears more than once"):
        build_bundle(tmp_path / "f", ["a", "a"], {"x_array": [0, 1], "y_array": [0, 1]})
    with pytest.raises(InputError, match="no x_pixel or y_pixel coordinates"):
        build_bundle(tmp_path / "f", ["a", "b"], {"x_array": [0, 1], "y_array": [0, 1]}, family="cell")
    with pytest.raises(InputError, match="no such features folder"):
        build_bundle(tmp_path / "nope", ["a", "b"], {"x_array": [0, 1], "y_array": [0, 1]})
    with pytest.raises(InputError, match=r"NaN or infinite x_array \(array_row\); the first is 'b'"):
        build_bundle(tmp_path / "f", ["a", "b"], {"x_array": [0, np.nan], "y_array": [0, 1]})
    with pytest.raises(DeepSpotError, match="unknown family"):
        build_bundle(tmp_path / "f", ["a", "b"], {"x_array": [0, 1], "y_array": [0, 1]}, family="tile")


def test_an_existing_bundle_folder_is_refused_and_help_says_so(tmp_path):
    # `deepspot bundle -o` replaces a .npz file but never a folder; the help and the error say which is which
    from typer.testing import CliRunner

    from deepspot.cli import app

    rng = np.random.default_rng(0)
    barcodes, x, y = spot_grid()
    write_features(tmp_path / "f", barcodes, rows=2, d=3, rng=rng)
    csv = write_csv(tmp_path / "coords.csv", barcodes, {"x_array": x, "y_array": y})
    args = ["bundle", "--features", str(tmp_path / "f"), "--obs", str(csv), "-o"]
    runner = CliRunner()
    for out in ("slide.npz", "slide"):
        assert runner.invoke(app, args + [str(tmp_path / out)]).exit_code == 0
    assert runner.invoke(app, args + [str(tmp_path / "slide.npz")]).exit_code == 0  # a file is replaced
    again = runner.invoke(app, args + [str(tmp_path / "slide")])
    assert again.exit_code == 2 and len(again.output.strip().splitlines()) == 1, again.output
    assert "a bundle folder is never replaced" in again.output, again.output
    help_text = " ".join(runner.invoke(app, ["bundle", "--help"], terminal_width=200).output.split())
    assert "a .npz file (replaced if it exists), or a new directory of .npy files" in help_text, help_text


# -- writing: the dense bags a block of rows at a time --------------------------------------------------------------
def _sample(tmp_path, family, rng):
    """13 items (a block of 5 rows does not divide them) with features and a CSV of coordinates."""
    barcodes, x, y = spot_grid()
    rows = 1 + 3 if family == "spot" else None
    write_features(tmp_path / "f", barcodes, rows=rows, d=6, rng=rng)
    coords = {"x_array": x, "y_array": y, "x_pixel": x * 100 + rng.uniform(0, 9, len(x)), "y_pixel": y * 100}
    return barcodes, coords, write_csv(tmp_path / "coords.csv", barcodes, coords)


@pytest.mark.parametrize("out", ["bundle.npz", "bundle"])
@pytest.mark.parametrize("family,dtype", [("spot", "fp32"), ("cell", "fp32"), ("cell", "fp16")])
def test_a_bundle_written_in_blocks_equals_the_one_built_in_memory(tmp_path, monkeypatch, out, family, dtype):
    """``bundle`` built the whole bundle in memory, the dense bags K times the features; now it gathers them a block
    of rows at a time into the file. Same keys, dtypes, shapes and bytes as the bundle built in memory."""
    import zipfile

    import deepspot.data as data
    import deepspot.layout as layout

    barcodes, coords, csv = _sample(tmp_path, family, np.random.default_rng(3))
    k = 6 if family == "cell" else 45
    whole = build_bundle(tmp_path / "f", barcodes, coords, family, radius=1, k=k, dtype=dtype)
    n, width, d = whole["neighbors"].shape
    itemsize = np.dtype(whole["neighbors"].dtype).itemsize
    monkeypatch.setattr(data, "WRITE_BLOCK_BYTES", 5 * width * d * itemsize)  # 5 bags a block: 5 + 5 + 3
    blocks = []
    gather = layout.NeighborBags.rows
    monkeypatch.setattr(layout.NeighborBags, "rows", lambda self, a, b: blocks.append((a, b)) or gather(self, a, b))
    write_bundle(tmp_path / out, tmp_path / "f", csv, family, radius=1, k=k, dtype=dtype)
    assert blocks == [(0, 5), (5, 10), (10, 13)]
    written = load_bundle(tmp_path / out)
    assert sorted(written.arrays) == sorted(whole)
    for key, expected in whole.items():
        got = written[key]
        assert isinstance(got, np.memmap), f"{key} is not memory-mapped"
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert np.asarray(got).tobytes() == np.ascontiguousarray(expected).tobytes(), key
    if out.endswith(".npz"):  # as np.savez writes it: members stored in order, which NumPy's own reader reads
        with zipfile.ZipFile(tmp_path / out) as zf:
            assert [i.filename for i in zf.infolist()] == [f"{key}.npy" for key in whole]
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        with np.load(tmp_path / out) as z:
            for key, expected in whole.items():
                np.testing.assert_array_equal(z[key], expected)
                assert z[key].dtype == expected.dtype
    else:
        for key, expected in whole.items():
            np.testing.assert_array_equal(np.load(tmp_path / out / f"{key}.npy"), expected)


def test_writing_dense_bags_needs_a_block_not_the_bags(tmp_path, monkeypatch):
    """The peak of ``write_bundle`` is the features and one block of bags, not the (N, K, D) bags."""
    import tracemalloc

    import deepspot.data as data

    rng = np.random.default_rng(0)
    n, d, k = 600, 128, 33
    barcodes = [f"c{i}" for i in range(n)]
    write_features(tmp_path / "f", barcodes, rows=None, d=d, rng=rng)
    coords = {"x_pixel": rng.uniform(0, 1000, n), "y_pixel": rng.uniform(0, 1000, n)}
    csv = write_csv(tmp_path / "coords.csv", barcodes, coords)
    monkeypatch.setattr(data, "WRITE_BLOCK_BYTES", 64 << 10)
    bags = n * (k - 1) * d * 4
    tracemalloc.start()
    try:
        write_bundle(tmp_path / "b.npz", tmp_path / "f", csv, "cell", k=k)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert load_bundle(tmp_path / "b.npz")["neighbors"].shape == (n, k - 1, d)
    assert peak < 0.2 * bags, f"writing peaked at {peak / bags:.2f}x the dense bags"


def test_a_bundle_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import collections
    import shutil

    barcodes, coords, csv = _sample(tmp_path, "cell", np.random.default_rng(0))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 30, 1 << 30, 1000))
    for out in ("b.npz", "b"):
        with pytest.raises(DeepSpotError, match=r"not enough free space for the bundle: needs \d+ MiB, 0 MiB free"):
            write_bundle(tmp_path / out, tmp_path / "f", csv, "cell", k=4)
        assert not (tmp_path / out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coords.csv", "f"]
