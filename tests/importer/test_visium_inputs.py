"""What users already have: scanpy/squidpy Visium AnnData, Space Ranger positions, TRIDENT/CLAM ``.h5`` features, the
reference's multi-sample layout, and predictions written with scanpy's conventions."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import deepspot
from deepspot.cli import app
from deepspot.data import load_bundle

runner = CliRunner()
D = 6


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def visium(tmp_path, n_side=4, off_tissue=(0, 5)):
    """A scanpy-style Visium AnnData (array_row, array_col, in_tissue, obsm['spatial'] = [col, row] pixels) and the
    reference's per-barcode feature files."""
    ad = pytest.importorskip("anndata")
    import pandas as pd

    rng = np.random.default_rng(0)
    n = n_side * n_side
    barcodes = [f"AAAC-{i}" for i in range(n)]
    rows, cols = np.divmod(np.arange(n), n_side)
    in_tissue = np.ones(n, int)
    in_tissue[list(off_tissue)] = 0
    obs = pd.DataFrame({"array_row": rows, "array_col": cols, "in_tissue": in_tissue}, index=barcodes)
    pxl_row, pxl_col = rows * 100.0 + 7, cols * 100.0 + 3
    adata = ad.AnnData(X=np.zeros((n, 1), np.float32), obs=obs)
    adata.obsm["spatial"] = np.column_stack([pxl_col, pxl_row])  # scanpy.read_visium: [pxl_col, pxl_row] = (x, y)
    adata.write_h5ad(tmp_path / "visium.h5ad")
    folder = tmp_path / "features"
    folder.mkdir()
    feats = {}
    for b in barcodes:
        feats[b] = rng.standard_normal((1 + 4, D)).astype(np.float32)
        np.save(folder / f"{b}.npy", feats[b])
    return tmp_path / "visium.h5ad", folder, barcodes, feats, (pxl_row, pxl_col), in_tissue


def test_scanpy_visium_anndata_leaves_out_spots_off_the_tissue(tmp_path):
    h5ad, folder, barcodes, feats, (pxl_row, pxl_col), in_tissue = visium(tmp_path)
    result = run("bundle", "--features", folder, "--obs", h5ad, "-o", tmp_path / "b.npz")
    assert result.exit_code == 0, result.output
    b = load_bundle(tmp_path / "b.npz")
    kept = [bc for bc, t in zip(barcodes, in_tissue) if t]
    assert b.barcodes == kept and b["spot"].shape == (len(kept), 1, D)
    np.testing.assert_array_equal(b["x_pixel"], pxl_row[in_tissue == 1])  # the reference's x is the row
    np.testing.assert_array_equal(b["y_pixel"], pxl_col[in_tissue == 1])
    np.testing.assert_array_equal(b["spot"][0, 0], feats[kept[0]][0])
    all_spots = run("bundle", "--features", folder, "--obs", h5ad, "-o", tmp_path / "all.npz", "--all-spots")
    assert all_spots.exit_code == 0 and load_bundle(tmp_path / "all.npz").barcodes == barcodes


def test_predictions_follow_scanpys_spatial_order(tmp_path):
    ad = pytest.importorskip("anndata")
    h5ad, folder, barcodes, _, (pxl_row, pxl_col), in_tissue = visium(tmp_path, off_tissue=())
    assert run("bundle", "--features", folder, "--obs", h5ad, "-o", tmp_path / "b.npz").exit_code == 0
    model = deepspot.create_model("spot", "subspot_neighbors", input_size=D, output_size=3, phi2rho_size=4, n_ensemble=2)
    ckpt = deepspot.save(model, tmp_path / "m.safetensors")
    result = run("infer", ckpt, "-i", tmp_path / "b.npz", "-o", tmp_path / "p.h5ad", "--no-progress")
    assert result.exit_code == 0, result.output
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    source = ad.read_h5ad(h5ad)
    # The same spatial array as scanpy.read_visium gives ([pxl_col_in_fullres, pxl_row_in_fullres]).
    np.testing.assert_array_equal(pred.obsm["spatial"], source.obsm["spatial"])
    assert list(pred.obs_names) == barcodes
    meta = pred.uns["deepspot"]
    assert meta["model_sha256"] == deepspot.checkpoint.file_hash(ckpt) and meta["deepspot_version"] == deepspot.__version__
    assert bool(meta["inverse_transform"]) is False


def test_space_ranger_tissue_positions_csv(tmp_path):
    _, folder, barcodes, _, (pxl_row, pxl_col), in_tissue = visium(tmp_path)
    lines = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"]
    for i, b in enumerate(barcodes):
        lines.append(f"{b},{in_tissue[i]},{i // 4},{i % 4},{pxl_row[i]},{pxl_col[i]}")
    (tmp_path / "tissue_positions.csv").write_text("\n".join(lines) + "\n")
    result = run("bundle", "--features", folder, "--obs", tmp_path / "tissue_positions.csv", "-o", tmp_path / "b.npz")
    assert result.exit_code == 0, result.output
    b = load_bundle(tmp_path / "b.npz")
    assert len(b.barcodes) == int(in_tissue.sum())
    np.testing.assert_array_equal(b["x_pixel"], pxl_row[in_tissue == 1])


@pytest.mark.parametrize("variant", ["space_ranger_1", "spreadsheet"])
def test_space_ranger_1_positions_without_header_and_a_spreadsheets_csv(tmp_path, variant):
    """Space Ranger 1.x's tissue_positions_list.csv has no header line, and a CSV saved by a spreadsheet starts with a
    byte-order mark: both were "no barcode column"."""
    _, folder, barcodes, _, (pxl_row, pxl_col), in_tissue = visium(tmp_path)
    lines = [f"{b},{in_tissue[i]},{i // 4},{i % 4},{int(pxl_row[i])},{int(pxl_col[i])}" for i, b in enumerate(barcodes)]
    if variant == "spreadsheet":
        lines.insert(0, "\ufeffbarcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres")
    obs = tmp_path / "tissue_positions_list.csv"
    obs.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    result = run("bundle", "--features", folder, "--obs", obs, "-o", tmp_path / "b.npz")
    assert result.exit_code == 0, result.output
    b = load_bundle(tmp_path / "b.npz")
    assert b.barcodes == [x for x, t in zip(barcodes, in_tissue) if t]  # the first line is a spot, kept
    np.testing.assert_array_equal(b["x_pixel"], pxl_row[in_tissue == 1])
    np.testing.assert_array_equal(b["y_pixel"], pxl_col[in_tissue == 1])


def test_trident_h5_features_matched_by_position(tmp_path):
    h5py = pytest.importorskip("h5py")
    h5ad, _, barcodes, _, (pxl_row, pxl_col), in_tissue = visium(tmp_path, off_tissue=())
    rng = np.random.default_rng(1)
    n = len(barcodes)
    order = rng.permutation(n)  # tiles in another order than the spots
    feats = rng.standard_normal((n, D)).astype(np.float32)
    with h5py.File(tmp_path / "slide.h5", "w") as f:
        f["features"] = feats[order]
        coords = f.create_dataset("coords", data=np.column_stack([pxl_col - 50, pxl_row - 50])[order])  # top-left
        coords.attrs["patch_size_level0"] = 100
    result = run("bundle", "--features-h5", tmp_path / "slide.h5", "--obs", h5ad, "-o", tmp_path / "b.npz", "--index")
    assert result.exit_code == 0, result.output
    b = load_bundle(tmp_path / "b.npz")
    np.testing.assert_array_equal(b["spot"][:, 0], feats)  # each spot got its own tile back
    assert "subspot" not in b
    with h5py.File(tmp_path / "far.h5", "w") as f:
        f["features"] = feats
        f.create_dataset("coords", data=np.column_stack([pxl_col + 400, pxl_row])).attrs["patch_size_level0"] = 100
    bad = run("bundle", "--features-h5", tmp_path / "far.h5", "--obs", h5ad, "-o", tmp_path / "x.npz")
    assert bad.exit_code == 2 and "have no tile within 50 px" in bad.output
    assert not (tmp_path / "x.npz").exists()
    # A spot near its tile's corner lies inside the tile (45 px off on both axes: 63.6 px from the centre in a
    # straight line, more than half a tile) and takes it.
    with h5py.File(tmp_path / "corner.h5", "w") as f:
        f["features"] = feats
        f.create_dataset("coords", data=np.column_stack([pxl_col - 5, pxl_row - 5])).attrs["patch_size_level0"] = 100
    result = run("bundle", "--features-h5", tmp_path / "corner.h5", "--obs", h5ad, "-o", tmp_path / "c.npz")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(load_bundle(tmp_path / "c.npz")["spot"][:, 0], feats)
    # Tiles on a grid much coarser than the spots: several spots in one tile is refused, not shared.
    with h5py.File(tmp_path / "grid.h5", "w") as f:
        grid = np.stack(np.meshgrid(np.arange(0, 5000, 2000), np.arange(0, 5000, 2000)), -1).reshape(-1, 2)
        f["features"] = rng.standard_normal((len(grid), D)).astype(np.float32)
        f.create_dataset("coords", data=grid).attrs["patch_size_level0"] = 2000
    bad = run("bundle", "--features-h5", tmp_path / "grid.h5", "--obs", h5ad, "-o", tmp_path / "g.npz")
    assert bad.exit_code == 2 and "items; the model takes a tile centred on each item" in bad.output, bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "g.npz").exists()


def test_features_h5_that_is_not_a_slides_h5_is_named_for_what_it_is(tmp_path):
    h5ad, folder, *_ = visium(tmp_path)
    out = tmp_path / "b.npz"
    for features, message in [
        (h5ad, "visium.h5ad: an .h5 of tile features holds 'features' (T, D) and 'coords' (T, 2)"),
        (tmp_path / "missing.h5", "missing.h5: no such file (--features-h5 takes the slide's .h5 of tile features)"),
        (folder, "features: a folder; give a folder of <barcode>.npy files as --features"),
    ]:
        result = run("bundle", "--features-h5", features, "--obs", h5ad, "-o", out)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert message in result.output and "no such features folder" not in result.output
        assert not out.exists()


def test_samples_split_by_sample_id_with_neighbours_inside_each(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    folder = tmp_path / "features"
    folder.mkdir()
    rows = []
    for sample in ("S1", "S2"):
        for i in range(9):
            b = f"{sample}_{i}"
            np.save(folder / f"{b}.npy", rng.standard_normal((1, D)).astype(np.float32))
            rows.append({"barcode": b, "x_array": i // 3, "y_array": i % 3, "sampleID": sample})
    pd.DataFrame(rows).to_csv(tmp_path / "obs.csv", index=False)  # both samples on the same array coordinates
    result = run("bundle", "--features", folder, "--obs", tmp_path / "obs.csv", "--by", "sampleID", "--index",
                 "-o", tmp_path / "bundles")  # fmt: skip
    assert result.exit_code == 0, result.output
    for sample in ("S1", "S2"):
        b = load_bundle(tmp_path / "bundles" / f"{sample}.npz")
        assert all(x.startswith(sample) for x in b.barcodes) and len(b.barcodes) == 9
        assert b["neighbor_index"].max() < 9  # neighbours never cross into the other sample
    missing = run("bundle", "--features", folder, "--obs", tmp_path / "obs.csv", "--by", "donor", "-o", tmp_path / "x")
    assert missing.exit_code == 2 and "no 'donor' column" in missing.output
    # --no-clobber: an existing sample bundle is refused before any is written; without it, they are replaced.
    (tmp_path / "bundles" / "S1.npz").unlink()
    before = (tmp_path / "bundles" / "S2.npz").stat().st_mtime_ns
    kept = run("bundle", "--features", folder, "--obs", tmp_path / "obs.csv", "--by", "sampleID", "--no-clobber",
               "-o", tmp_path / "bundles")  # fmt: skip
    assert kept.exit_code == 2 and "S2.npz: already exists" in kept.output, kept.output
    assert not (tmp_path / "bundles" / "S1.npz").exists()
    assert (tmp_path / "bundles" / "S2.npz").stat().st_mtime_ns == before


def test_bundle_no_clobber_refuses_an_existing_output(tmp_path):
    h5ad, folder, *_ = visium(tmp_path)
    out = tmp_path / "b.npz"
    out.write_bytes(b"keep me")
    refused = run("bundle", "--features", folder, "--obs", h5ad, "-o", out, "--no-clobber")
    assert refused.exit_code == 2 and "already exists, and --no-clobber forbids" in refused.output
    assert out.read_bytes() == b"keep me"
    replaced = run("bundle", "--features", folder, "--obs", h5ad, "-o", out)
    assert replaced.exit_code == 0, replaced.output
    assert len(load_bundle(out).barcodes) == 14


def test_a_barcode_that_appears_twice_is_refused(tmp_path):
    _, folder, barcodes, *_ = visium(tmp_path)
    (tmp_path / "obs.csv").write_text("barcode,x_array,y_array\n" + "".join(
        f"{b},{i},0\n" for i, b in enumerate(barcodes[:3] + barcodes[:1])))  # fmt: skip
    result = run("bundle", "--features", folder, "--obs", tmp_path / "obs.csv", "-o", tmp_path / "b.npz")
    assert result.exit_code == 2 and f"barcode {barcodes[0]!r} appears more than once" in result.output
    assert not (tmp_path / "b.npz").exists()


def test_a_nan_coordinate_is_refused_naming_the_column_and_the_item(tmp_path):
    """A NaN pixel position crashed tile matching with a traceback, went into the bundle (and obsm['spatial']) without
    tiles, and a NaN array position was an error that named neither the file nor the spot."""
    h5py = pytest.importorskip("h5py")
    h5ad, folder, barcodes, _, (pxl_row, pxl_col), _ = visium(tmp_path, off_tissue=())
    with h5py.File(tmp_path / "slide.h5", "w") as f:
        f["features"] = np.zeros((len(barcodes), D), np.float32)
        f.create_dataset("coords", data=np.column_stack([pxl_col - 50, pxl_row - 50])).attrs["patch_size_level0"] = 100
    for column, value in (("pxl_row_in_fullres", "nan"), ("array_row", "inf"), ("pxl_col_in_fullres", "nan")):
        rows = [[b, r, c, pr, pc] for b, r, c, pr, pc in zip(barcodes, *np.divmod(np.arange(16), 4), pxl_row, pxl_col)]
        header = ["barcode", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
        rows[3][header.index(column)] = value
        obs = tmp_path / "obs.csv"
        obs.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
        for features in (("--features", folder), ("--features-h5", tmp_path / "slide.h5")):
            result = run("bundle", *features, "--obs", obs, "-o", tmp_path / "b.npz")
            assert result.exit_code == 2, result.output
            line = result.output.strip()
            assert len(line.splitlines()) == 1 and "obs.csv: 1 item(s) have a NaN or infinite" in line, line
            assert f"({column}); the first is {barcodes[3]!r}" in line, line
            assert not (tmp_path / "b.npz").exists()
    obs.write_text("barcode,array_row,array_col\n" + "".join(f"{b},{i},\n" for i, b in enumerate(barcodes)))
    result = run("bundle", "--features", folder, "--obs", obs, "-o", tmp_path / "b.npz")
    assert result.exit_code == 2 and "obs.csv: line 2: column 'array_col' is empty" in result.output, result.output


def test_samples_are_written_all_or_none(tmp_path):
    """A sample whose name the file system refuses (too long) failed after the samples before it were written."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "features"
    folder.mkdir()
    lines = ["barcode,x_array,y_array,sampleID"]
    for sample in ("S1", "S" * 300):
        for i in range(2):
            np.save(folder / f"{sample[:8]}_{i}.npy", rng.standard_normal((1, D)).astype(np.float32))
            lines.append(f"{sample[:8]}_{i},{i},0,{sample}")
    (tmp_path / "obs.csv").write_text("\n".join(lines) + "\n")
    result = run("bundle", "--features", folder, "--obs", tmp_path / "obs.csv", "--by", "sampleID",
                 "-o", tmp_path / "bundles")  # fmt: skip
    assert result.exit_code == 2 and "cannot write here" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "bundles").exists()  # neither S1.npz nor the folder made for it
    (tmp_path / "bundles").mkdir()  # a folder that was there stays, empty
    assert run("bundle", "--features", folder, "--obs", tmp_path / "obs.csv", "--by", "sampleID",
               "-o", tmp_path / "bundles").exit_code == 2  # fmt: skip
    assert list((tmp_path / "bundles").iterdir()) == []


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_h5_features_are_read_a_block_at_a_time_into_the_items_order(tmp_path, monkeypatch, dtype):
    """A slide's .h5 (500,000 tiles x 1,024 features is 2 GB) was read whole, copied into the items' order and
    cast: 2-2.5x the bundle's features. Now only the matched tiles are kept, block by block, in the bundle's dtype."""
    import tracemalloc

    h5py = pytest.importorskip("h5py")
    import deepspot.layout as layout

    rng = np.random.default_rng(2)
    t, d = 3000, 64
    centres = np.column_stack([np.arange(t) % 60 * 200.0 + 100, np.arange(t) // 60 * 200.0 + 100])  # (x, y)
    feats = rng.standard_normal((t, d)).astype(np.float32)
    with h5py.File(tmp_path / "slide.h5", "w") as f:
        f["features"] = feats
        f.create_dataset("coords", data=centres - 50).attrs["patch_size_level0"] = 100
    items = rng.permutation(t)[:2000]  # a third of the tiles are no item's, and items come in another order
    coords = {"x_pixel": centres[items, 1] + 3, "y_pixel": centres[items, 0] - 7}
    monkeypatch.setattr(layout, "H5_BLOCK_BYTES", 16 << 10, raising=False)  # 64 tiles a block
    tracemalloc.start()
    try:
        got = layout.read_h5_features(tmp_path / "slide.h5", coords, dtype=dtype).own
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = feats[items].astype(np.float16 if dtype == "fp16" else np.float32)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert peak < 1.5 * want.nbytes + (200 << 10), f"peak {peak / want.nbytes:.2f}x the features kept"


def test_fp16_bags_are_gathered_in_fp16_not_cast_after(tmp_path):
    """--dense --dtype fp16 gathered the (N, K, D) bags in float32 and then cast them: 1.5x the fp32 bags at the
    peak (1,160 MiB for 20,000 cells, K=8, D=1,024). The features are now cast first and the bags made in fp16."""
    import tracemalloc

    from deepspot.data import cast_features
    from deepspot.layout import build_bundle

    n, d = 3000, 64
    rng = np.random.default_rng(3)
    (tmp_path / "f").mkdir()
    feats = rng.standard_normal((n, d)).astype(np.float32)
    barcodes = [f"c{i}" for i in range(n)]
    for b, x in zip(barcodes, feats):
        np.save(tmp_path / "f" / f"{b}.npy", x)
    coords = {"x_pixel": rng.uniform(0, 1000, n), "y_pixel": rng.uniform(0, 1000, n)}
    want = cast_features(build_bundle(tmp_path / "f", barcodes, coords, "cell", k=9), "fp16")
    tracemalloc.start()
    try:
        got = build_bundle(tmp_path / "f", barcodes, coords, "cell", k=9, dtype="fp16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for key in ("cell", "neighbors"):
        assert got[key].dtype == np.float16
        np.testing.assert_array_equal(got[key], want[key])
    bags = got["neighbors"].nbytes  # fp16; the fp32 bags alone would be twice this
    assert peak < 1.75 * bags, f"peak {peak / bags:.2f}x the fp16 bags"
