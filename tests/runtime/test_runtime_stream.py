"""Streaming batch inference: equal to the model for every mode, input checks, atomic outputs."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest

from deepspot.data import save_bundle
from deepspot.errors import ConfigError, DeepSpotError, InputError
from deepspot.modes import MODES
from deepspot.runtime import check_inputs, infer, load_runner
from deepspot.runtime.base import ModelInfo
from deepspot.runtime.stream import batches, first_nonfinite_row, predict

ALL_MODES = [pytest.param(m.family, m.name, id=m.key) for m in MODES]


@pytest.mark.parametrize(("family", "mode"), ALL_MODES)
@pytest.mark.parametrize("backend", ["torch", "ort-cpu"])
def test_streamed_predictions_equal_the_model_across_batch_boundaries(
    artifacts, eager, tmp_path, family, mode, backend
):
    a = artifacts(family, mode, n=37)  # 37 = 4 full batches of 8 and a short one
    model_file = a.checkpoint if backend == "torch" else a.onnx
    result = infer(model_file, a.bundle, tmp_path / "p.npy", backend, batch_size=8)
    got = np.load(tmp_path / "p.npy")
    expected = eager(a.model, a.inputs())
    assert got.shape == (37, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * (1 + np.abs(expected).max()))
    assert (result.n, result.genes, result.backend, result.batch_size) == (37, 5, backend, 8)
    assert result.items_per_s > 0 and not result.inverse_transform


def test_inverse_transform_uses_the_model_scaler(artifacts, eager, tmp_path):
    a = artifacts()
    infer(a.onnx, a.bundle, tmp_path / "p.npy", inverse_transform=True, batch_size=16)
    expected = a.model.scaler.inverse_transform(eager(a.model, a.inputs()))
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-5, atol=1e-4)


def test_npz_output_carries_barcodes_and_genes(artifacts, tmp_path):
    a = artifacts("cell", "neighbors")
    infer(a.onnx, a.bundle, tmp_path / "p.npz", batch_size=10)
    with np.load(tmp_path / "p.npz") as z:  # plain np.load, no pickles
        assert sorted(z.files) == ["barcodes", "genes", "predictions"]
        assert z["predictions"].shape == (37, 5)
        assert list(z["barcodes"]) == list(a.arrays["barcode"]) and list(z["genes"]) == a.model.genes


@pytest.mark.skipif(
    importlib.util.find_spec("anndata") is None, reason="needs anndata (pip install 'deepspot[anndata]')"
)
def test_h5ad_output(artifacts, tmp_path):
    import anndata

    a = artifacts()
    infer(a.checkpoint, a.bundle, tmp_path / "p.h5ad", batch_size=16)
    adata = anndata.read_h5ad(tmp_path / "p.h5ad")
    assert adata.shape == (37, 5) and list(adata.var_names) == a.model.genes
    assert list(adata.obs_names) == list(a.arrays["barcode"])


def test_infer_takes_a_loaded_bundle_or_arrays_in_memory(artifacts, tmp_path):
    # A Python user holds a load_bundle() result or arrays; infer took only a path (TypeError from pathlib).
    from deepspot.data import load_bundle

    a = artifacts("cell", "neighbors")
    infer(a.onnx, a.bundle, tmp_path / "path.npz", batch_size=10)
    bundle = load_bundle(a.bundle)
    assert repr(bundle).startswith(f"Bundle({a.bundle}, {{cell: (37, 16) float32, ")  # shapes, not values
    infer(a.onnx, bundle, tmp_path / "bundle.npz", batch_size=10)
    infer(a.onnx, dict(a.arrays), tmp_path / "arrays.npz", batch_size=10)
    with np.load(tmp_path / "path.npz") as want:
        for name in ("bundle", "arrays"):
            with np.load(tmp_path / f"{name}.npz") as got:
                assert all(np.array_equal(got[k], want[k]) for k in want.files)
    with pytest.raises(InputError, match="bundle: missing 'neighbors'"):
        infer(a.onnx, {"cell": a.arrays["cell"]}, tmp_path / "p.npy")
    with pytest.raises(InputError, match="unknown bundle array 'features'"):
        infer(a.onnx, {"features": a.arrays["cell"]}, tmp_path / "p.npy")
    with pytest.raises(TypeError, match="a bundle's path, a deepspot.data.Bundle or arrays by name, not a list"):
        infer(a.onnx, [a.arrays["cell"]], tmp_path / "p.npy")
    with pytest.raises(DeepSpotError, match="is an input of this run"):
        infer(a.onnx, bundle, a.bundle)


def test_failed_run_leaves_no_output(artifacts, tmp_path, monkeypatch):
    a = artifacts()
    from deepspot.runtime.ort import OrtRunner

    calls = {"n": 0}
    original = OrtRunner.infer_impl

    def fail_on_third_batch(self, feed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-run
        return original(self, feed)

    monkeypatch.setattr(OrtRunner, "infer_impl", fail_on_third_batch)
    for name in ("p.npy", "p.npz"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            infer(a.onnx, a.bundle, tmp_path / name, batch_size=8)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file
    (tmp_path / "old.npy").write_bytes(b"previous result")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        infer(a.onnx, a.bundle, tmp_path / "old.npy", batch_size=8)
    assert (tmp_path / "old.npy").read_bytes() == b"previous result"  # an earlier file is left as it was


def test_input_checks_name_rank_feature_size_and_finite_values(artifacts):
    a = artifacts()
    info = ModelInfo.from_model(a.model)
    good = {k: np.array(v) for k, v in a.inputs().items()}
    assert check_inputs(good, info) == 37
    with pytest.raises(InputError, match="missing input 'subspot'"):
        check_inputs({k: v for k, v in good.items() if k != "subspot"}, info)
    with pytest.raises(InputError, match="unexpected input 'cell'"):
        check_inputs({**good, "cell": good["spot"]}, info)
    with pytest.raises(InputError, match=r"'neighbors' must have shape \(N, T, D\)"):
        check_inputs({**good, "neighbors": good["neighbors"][:, 0]}, info)
    with pytest.raises(InputError, match="has 15 features, the model expects 16"):
        check_inputs({**good, "subspot": good["subspot"][..., :15]}, info)
    with pytest.raises(InputError, match="has 36 rows"):
        check_inputs({**good, "subspot": good["subspot"][:36]}, info)
    bad = good["neighbors"].copy()
    bad[23, 2, 5] = np.nan
    with pytest.raises(InputError, match="'neighbors' holds a non-finite value .* in row 23"):
        check_inputs({**good, "neighbors": bad}, info)
    bad[23, 2, 5] = 0
    bad[30, 0, 0] = -np.inf
    with pytest.raises(InputError, match="row 30"):
        check_inputs({**good, "neighbors": bad}, info)


def test_nonfinite_rows_are_found_chunk_by_chunk():
    a = np.zeros((1000, 3, 4), dtype=np.float32)
    assert first_nonfinite_row(a, chunk_bytes=100) is None
    a[997, 1, 2] = np.inf
    a[998] = np.nan
    assert first_nonfinite_row(a, chunk_bytes=100) == 997  # chunks of 2 rows: the last chunk is found
    assert first_nonfinite_row(a) == 997


def test_bad_bundles_are_refused_before_anything_runs(artifacts, tmp_path):
    a = artifacts()
    arrays = dict(a.arrays)
    arrays["subspot"] = arrays["subspot"].copy()
    arrays["subspot"][11, 0, 0] = np.nan
    save_bundle(tmp_path / "nan.npz", arrays)
    with pytest.raises(InputError, match="'subspot' holds a non-finite value .* in row 11"):
        infer(a.onnx, tmp_path / "nan.npz", tmp_path / "out.npy")
    save_bundle(tmp_path / "narrow.npz", {**a.arrays, "spot": a.arrays["spot"][:, :8]})
    with pytest.raises(InputError, match="features, the model expects 16"):
        infer(a.onnx, tmp_path / "narrow.npz", tmp_path / "out.npy")
    cell = artifacts("cell", "neighbors")
    with pytest.raises(InputError, match="holds 'cell' features, but the model is a spot model"):
        infer(a.onnx, cell.bundle, tmp_path / "out.npy")
    index = {k: v for k, v in a.arrays.items() if k != "neighbors"}
    index["neighbor_index"] = np.zeros((37, 4), dtype=np.int64)
    save_bundle(tmp_path / "indexed.npz", index)
    # A per-item graph does not silently take an indexed bundle: it says how to run it.
    with pytest.raises(ConfigError, match="cannot run the indexed layout .*export_indexed, or pass layout='dense'"):
        infer(a.onnx, tmp_path / "indexed.npz", tmp_path / "out.npy")
    index["neighbor_index"][3, 1] = 37  # out of range, reported by row even on the dense path
    save_bundle(tmp_path / "indexed.npz", index)
    with pytest.raises(InputError, match="'neighbor_index' row 3 holds 37, out of range"):
        infer(a.onnx, tmp_path / "indexed.npz", tmp_path / "out.npy", layout="dense")
    with pytest.raises(ConfigError, match="unknown output type"):
        infer(a.onnx, a.bundle, tmp_path / "out.csv")
    with pytest.raises(DeepSpotError, match="does not exist"):
        infer(a.onnx, a.bundle, tmp_path / "missing" / "out.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["indexed.npz", "nan.npz", "narrow.npz"]


def test_prefetching_batches_in_order_and_errors_reach_the_caller():
    x = np.arange(23 * 2 * 3, dtype=np.float64).reshape(23, 2, 3)
    got = list(batches({"x": x}, 5))
    assert [(s, e) for s, e, _ in got] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert all(f["x"].dtype == np.float32 and f["x"].flags.c_contiguous for _, _, f in got)
    np.testing.assert_array_equal(np.concatenate([f["x"] for _, _, f in got]), x.astype(np.float32))

    class Exploding(np.ndarray):
        def __getitem__(self, item):
            if isinstance(item, slice) and item.start == 10:
                raise OSError("disk went away")
            return super().__getitem__(item)

    with pytest.raises(OSError, match="disk went away"):
        list(batches({"x": x.view(Exploding)}, 5))
    before = threading.active_count()
    for _start, _stop, _feed in batches({"x": np.zeros((10_000, 1, 1))}, 1):
        break  # the consumer stops early: the worker must end too
    assert threading.active_count() <= before
    with pytest.raises(ConfigError, match="batch size"):
        next(batches({"x": x}, 0))


def test_predict_in_memory(artifacts, eager):
    a = artifacts("spot", "neighbors")
    with load_runner(a.onnx) as runner:
        y = predict(runner, a.inputs(), batch_size=6)
    np.testing.assert_allclose(y, eager(a.model, a.inputs()), atol=1e-5)


def _rss_file_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:")), None)
    except OSError:
        return None


def test_streamed_pages_are_given_back(tmp_path):
    """Rows already streamed leave the resident set, so peak memory does not grow with the number of items."""
    from deepspot._pages import release_rows

    if _rss_file_mb() is None:
        pytest.skip("needs Linux /proc/self/status")
    np.save(tmp_path / "x.npy", np.ones((4096, 4096), dtype=np.float32))  # 64 MiB
    x = np.load(tmp_path / "x.npy", mmap_mode="r")[:, None, :]  # a view, as Bundle.inputs gives
    before = _rss_file_mb()
    assert float(x[:, 0, ::1024].sum()) == 4096 * 4  # touch every page
    touched = _rss_file_mb()
    release_rows(x, 0, 4096)
    after = _rss_file_mb()
    assert touched - before > 32 and touched - after > 32
    assert float(np.asarray(x[100:101]).sum()) == 4096  # the data is still there, read back from the file
    release_rows(np.ones((3, 3)), 0, 3)  # ordinary memory: nothing to do


def test_pages_of_private_mappings_are_kept_and_views_release_their_own_rows(tmp_path):
    """A copy-on-write mapping (``mmap_mode="c"``) holds its writes only in its pages: dropping them would revert the
    rows to the file. A view of a memory map (``emb[1:]``) releases its own rows, not rows shifted by its offset."""
    from deepspot._pages import _mapping, release_rows

    np.save(tmp_path / "x.npy", np.zeros((2048, 1024), dtype=np.float32))
    private = np.load(tmp_path / "x.npy", mmap_mode="c")
    private[:] = 7.0
    release_rows(private, 0, len(private))
    assert (private == 7.0).all()
    shared = np.load(tmp_path / "x.npy", mmap_mode="r+")
    assert _mapping(shared[1:])[1] == _mapping(shared)[1]  # the mapping's start, whichever view asks
    shared[:] = 3.0
    release_rows(shared[1:], 0, 2047)  # a shared mapping: the writes are in the file
    assert (shared == 3.0).all()


def test_h5ad_predictions_are_written_a_block_at_a_time(tmp_path):
    """The ``.h5ad``'s X is copied from the memory-mapped predictions in blocks whose pages are given back, so writing
    a slide's predictions does not hold them all resident; the file reads back as anndata wrote it."""
    ad = pytest.importorskip("anndata")
    from deepspot.anndata_io import write_anndata

    if _rss_file_mb() is None:
        pytest.skip("needs Linux /proc/self/status")
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(8192, 2048))  # 64 MiB
    x[:] = rng.standard_normal((1, 2048), dtype=np.float32)
    x[::7] = 2.5
    x.flush()
    x = np.load(tmp_path / "p.npy", mmap_mode="r")
    before = _rss_file_mb()
    coords = {"x_pixel": np.arange(8192.0), "y_pixel": np.zeros(8192)}
    genes = [f"g{j}" for j in range(2048)]
    write_anndata(tmp_path / "p.h5ad", x, genes=genes, obs_coords=coords, uns={"deepspot": {"backend": "ort-cpu"}})
    assert _rss_file_mb() - before < 32
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert back.X.dtype == np.float32 and back.shape == (8192, 2048)
    np.testing.assert_array_equal(back.X, x)
    assert list(back.var_names[:2]) == ["g0", "g1"] and back.obsm["spatial"].shape == (8192, 2)
    assert back.uns["deepspot"]["backend"] == "ort-cpu"


def test_predict_on_no_items_gives_an_empty_array_on_both_paths(artifacts):
    from deepspot.runtime import load_runner
    from deepspot.runtime.stream import predict

    a = artifacts("cell", "neighbors")
    empty = {k: v[:0] for k, v in a.inputs().items()}
    with load_runner(a.onnx, "ort-cpu") as r:
        for pipelined in (False, True):
            out = predict(r, empty, 8, pipelined=pipelined)
            assert out.shape == (0, a.model.output_size) and out.dtype == np.float32


def test_repeated_names_in_an_h5ad_are_one_warning_of_ours(tmp_path):
    pytest.importorskip("anndata")
    import warnings

    from deepspot.anndata_io import write_anndata
    from deepspot.errors import DeepSpotWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_anndata(tmp_path / "p.h5ad", np.zeros((3, 2), np.float32), barcodes=["a", "b", "a"], genes=["g", "g"])
    ours = [str(w.message) for w in caught if issubclass(w.category, DeepSpotWarning)]
    assert len(ours) == 2, ours
    assert "1 barcodes repeat an earlier one" in ours[0] and "obs_names_make_unique" in ours[0]
    assert "1 gene names repeat" in ours[1]
    assert not [w for w in caught if "names are not unique" in str(w.message)]  # anndata's own is not repeated


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_bundle_without_items_gives_empty_predictions_and_says_so(tmp_path, artifacts, suffix):
    from typer.testing import CliRunner

    from deepspot.cli import app
    from deepspot.data import save_bundle

    a = artifacts("cell", "neighbors")
    empty = save_bundle(tmp_path / "empty.npz", {k: v if k == "genes" else v[:0] for k, v in a.arrays.items()})
    result = CliRunner().invoke(app, ["infer", str(a.onnx), "-i", str(empty), "-o", str(tmp_path / f"p{suffix}")])
    assert result.exit_code == 0, result.output
    assert "Warning: " in result.output
    assert "the bundle holds no items, so the predictions have no rows" in result.output
    got = np.load(tmp_path / f"p{suffix}")
    assert (got if suffix == ".npy" else got["predictions"]).shape == (0, a.model.output_size)


def test_infer_s_errors_name_its_arguments_from_python_and_its_flags_from_the_command_line(artifacts, tmp_path):
    """A Python caller read ``--batch-size`` and ``--layout dense``, flags of a command it never ran."""
    from typer.testing import CliRunner

    from deepspot.cli import app

    from _cli import error_line

    a = artifacts()
    out = tmp_path / "p.npy"
    with pytest.raises(ConfigError) as e:
        infer(a.onnx, a.bundle, out, batch_size=0)
    assert str(e.value) == "batch_size must be at least 1, got 0"
    with pytest.raises(ConfigError) as e:
        infer(a.onnx, a.bundle, out, layout="indexed")
    assert str(e.value).endswith("the indexed layout needs 'neighbor_index' in the bundle (deepspot.layout.write_bundle"
                                 "(..., index=True)); this bundle holds neighbour features, so run it with "
                                 "layout='dense'"), str(e.value)  # fmt: skip
    cli = CliRunner()
    args = ["infer", str(a.onnx), "-i", str(a.bundle), "-o", str(out)]
    assert error_line(cli.invoke(app, [*args, "--batch-size", "0"])) == "Error: --batch-size must be at least 1, got 0"
    error_line(cli.invoke(app, [*args, "--layout", "indexed"]),
               "(deepspot bundle --index); this bundle holds neighbour features, so run it with --layout dense")  # fmt: skip
    assert not out.exists()
