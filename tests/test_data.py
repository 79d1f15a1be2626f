"""Feature bundles: formats, memory mapping, validation against a model, and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest

from deepspot.data import load_bundle, save_bundle, synth_bundle
from deepspot.errors import InputError
from deepspot.modes import get_mode


@pytest.mark.parametrize("suffix", [".npz", ""])
def test_round_trip_and_memory_mapping(tmp_path, suffix):
    arrays = synth_bundle("spot", "subspot_neighbors", 30, input_size=5, genes=3, seed=2)
    path = save_bundle(tmp_path / f"b{suffix}", arrays)
    bundle = load_bundle(path)
    for k, v in arrays.items():
        np.testing.assert_array_equal(bundle[k], v)
    assert isinstance(bundle["subspot"], np.memmap)  # both formats map the feature arrays, nothing is read yet
    assert bundle.genes == [f"gene_{j:04d}" for j in range(3)] and bundle.barcodes[0] == "spot_000000"
    mode = bundle.validate("spot", "subspot_neighbors", input_size=5, output_size=3, require_target=True)
    inputs = bundle.inputs(mode)
    assert inputs["spot"].shape == (30, 1, 5) and inputs["neighbors"].shape == (30, 6, 5)


def test_synthetic_data_is_seeded():
    a = synth_bundle("cell", "neighbors", 10, input_size=4, genes=2, seed=5)
    b = synth_bundle("cell", "neighbors", 10, input_size=4, genes=2, seed=5)
    c = synth_bundle("cell", "neighbors", 10, input_size=4, genes=2, seed=6)
    assert set(a) == {"cell", "neighbors", "target", "barcode", "genes"} and a["neighbors"].shape == (10, 8, 4)
    np.testing.assert_array_equal(a["target"], b["target"])
    assert not np.array_equal(a["target"], c["target"])


@pytest.mark.parametrize(
    "edit, kwargs, message",
    [
        (lambda a: a.pop("neighbors"), {}, "missing 'neighbors', which mode 'spot_subspot_neighbors' needs"),
        (lambda a: a.update(subspot=a["subspot"][:, :, :4]), {"input_size": 5}, "'subspot' has 4 features"),
        (lambda a: a.update(neighbors=a["neighbors"][:7]), {}, "'neighbors' has 7 rows, 'spot' has 12"),
        (lambda a: a.update(spot=a["subspot"]), {}, "'spot' must have shape (N, D) or (N, 1, D)"),
        (lambda a: a.pop("target"), {"require_target": True}, "missing 'target'"),
        (lambda a: a.update(target=a["target"][:, :2]), {"output_size": 3}, "'target' has 2 genes"),
        (lambda a: a.update(subspot=a["subspot"].astype(np.int32)), {}, "'subspot' must be floating point"),
    ],
)
def test_validation_errors_name_the_problem(tmp_path, edit, kwargs, message):
    arrays = synth_bundle("spot", "subspot_neighbors", 12, input_size=5, genes=3)
    edit(arrays)
    bundle = load_bundle(save_bundle(tmp_path / "b.npz", arrays))
    with pytest.raises(InputError) as err:
        bundle.validate("spot", "subspot_neighbors", **kwargs)
    assert message in str(err.value) and str(tmp_path / "b.npz") in str(err.value)


def test_wrong_family():
    from deepspot.data import Bundle

    arrays = synth_bundle("spot", "neighbors", 4, input_size=5, genes=3)
    with pytest.raises(InputError, match="holds 'spot' features, but the model is a cell model"):
        Bundle(arrays).validate("cell", "neighbors")


def test_unreadable_bundles(tmp_path):
    with pytest.raises(InputError, match="no such bundle"):
        load_bundle(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="not a .npz bundle"):
        load_bundle(tmp_path / "garbage.npz")
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(InputError, match="unknown array 'weights'"):
        load_bundle(tmp_path / "foreign.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .npy files"):
        load_bundle(tmp_path / "empty")


def test_compressed_npz_is_read_in_memory(tmp_path):
    arrays = synth_bundle("cell", "cell", 6, input_size=3, genes=2)
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    bundle = load_bundle(tmp_path / "c.npz")
    np.testing.assert_array_equal(bundle["cell"], arrays["cell"])
    assert bundle.validate("cell", "cell") == get_mode("cell", "cell")


def test_nearest_neighbours_of_a_slide_smaller_than_k_are_padded_with_minus_one():
    from deepspot.data import neighbor_index_knn

    index = neighbor_index_knn(np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]), 4)
    np.testing.assert_array_equal(index, [[1, 2, -1, -1], [0, 2, -1, -1], [1, 0, -1, -1]])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_names_saved_from_a_pandas_index_are_refused_with_the_way_to_save_them(tmp_path, save):
    """``np.asarray(adata.obs_names)`` is an object array, which ``np.savez`` pickles: the error says to save the names
    as text, and the README's ``dtype=str`` bundle loads with its names."""
    pd = pytest.importorskip("pandas")
    arrays = synth_bundle("cell", "cell", 4, input_size=3, genes=2)
    names = pd.Index([f"{i:04d}-1" for i in range(4)])
    save(tmp_path / "objects.npz", **{**arrays, "barcode": np.asarray(names)})
    with pytest.raises(InputError, match=r"'barcode'|Python objects") as error:
        load_bundle(tmp_path / "objects.npz")
    assert "np.asarray(names, dtype=str)" in str(error.value) and "allow_pickle" not in str(error.value)
    save(tmp_path / "text.npz", **{**arrays, "barcode": np.asarray(names, dtype=str)})
    assert load_bundle(tmp_path / "text.npz").barcodes == ["0000-1", "0001-1", "0002-1", "0003-1"]


@pytest.mark.parametrize("name", ["slide.NPZ", "slide.Npz"])
def test_a_npz_suffix_in_capitals_writes_a_npz_file_not_a_folder(tmp_path, name):
    # load_bundle and infer take any case; save_bundle wrote a folder named slide.NPZ
    data = synth_bundle("spot", "spot", n=5, input_size=3, genes=2, seed=0)
    path = save_bundle(tmp_path / name, data)
    assert path.is_file(), "a folder was written"
    np.testing.assert_array_equal(np.asarray(load_bundle(path).arrays["target"]), data["target"])


def test_neighbours_given_both_as_features_and_by_index_are_refused_for_inference(tmp_path):
    # which of the two would run depended on the layout (an indexed export read the index, a per-item graph the
    # features), so a bundle whose two disagree gave one answer or the other without a word
    data = synth_bundle("cell", "neighbors", 6, 4, 2, seed=0, n_neighbors=3)
    data["neighbor_index"] = np.zeros((6, 3), np.int64)
    bundle = load_bundle(save_bundle(tmp_path / "both.npz", data))
    with pytest.raises(InputError, match="holds both 'neighbors' and 'neighbor_index'.*keep one"):
        bundle.validate("cell", "neighbors", allow_index=True)
    with pytest.warns(UserWarning, match="ignoring 'neighbor_index'"):  # training reads the features, as before
        bundle.validate("cell", "neighbors")


def _traced_peak(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("family,mode", [("cell", "neighbors"), ("spot", "subspot_neighbors")])
def test_synthetic_data_is_drawn_in_blocks_without_float64_copies(monkeypatch, family, mode):
    """At a slide's size (--n 500000 --input-size 1024) a float64 draw of each array beside its float32 copy took 3x
    the bundle's memory; drawn a block of rows at a time, the peak is the bundle itself, with the same numbers."""
    import deepspot.data as data

    args = (family, mode, 1500, 64, 8)
    kwargs = {"seed": 4, "n_subspots": 3, "n_neighbors": 8}
    whole = synth_bundle(*args, **kwargs)
    monkeypatch.setattr(data, "SYNTH_BLOCK_BYTES", 64 << 10, raising=False)
    blocks, peak = _traced_peak(lambda: synth_bundle(*args, **kwargs))
    assert list(blocks) == list(whole)
    for k in whole:
        np.testing.assert_array_equal(blocks[k], whole[k])
    size = sum(a.nbytes for a in blocks.values())
    assert peak < 1.25 * size, f"synth_bundle peaked at {peak / size:.2f}x the bundle's size"


def test_casting_features_to_fp16_makes_no_full_size_temporary(monkeypatch):
    import deepspot.data as data
    from deepspot.data import cast_features

    monkeypatch.setattr(data, "SYNTH_BLOCK_BYTES", 64 << 10, raising=False)
    x = np.random.default_rng(0).normal(size=(4000, 8, 32)).astype(np.float32)
    out, peak = _traced_peak(lambda: cast_features({"neighbors": x}, "fp16"))
    np.testing.assert_array_equal(out["neighbors"], x.astype(np.float16))
    assert peak < 0.75 * x.nbytes, f"casting allocated {peak / x.nbytes:.2f}x the fp32 array"
    x[5, 2, 1] = 1e6
    with pytest.raises(InputError, match="beyond float16's range"):
        cast_features({"neighbors": x}, "fp16")


@pytest.mark.parametrize("suffix", [".npz", ""])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_synthetic_neighbours_streamed_to_the_file_are_the_bundle_drawn_in_memory(tmp_path, monkeypatch, suffix,
                                                                                   dtype):
    """``synth`` drew the whole bundle, neighbours (K times the features) included, before writing; with ``stream``
    they are drawn again a block at a time as they are written: the same keys, dtypes and numbers."""
    import deepspot.data as data
    from deepspot.data import cast_features

    args = ("cell", "neighbors", 13, 16, 4)
    whole = cast_features(synth_bundle(*args, seed=2, n_neighbors=5), dtype)
    monkeypatch.setattr(data, "WRITE_BLOCK_BYTES", 5 * 5 * 16 * np.dtype(whole["neighbors"].dtype).itemsize)
    streamed = cast_features(synth_bundle(*args, seed=2, n_neighbors=5, stream=True), dtype)
    assert not isinstance(streamed["neighbors"], np.ndarray)
    written = load_bundle(save_bundle(tmp_path / f"b{suffix}", streamed))
    assert sorted(written.arrays) == sorted(whole)
    for key, expected in whole.items():
        assert written[key].dtype == expected.dtype and written[key].shape == expected.shape, key
        assert np.asarray(written[key]).tobytes() == expected.tobytes(), key
    with pytest.raises(ValueError, match="drawn in order"):
        streamed["neighbors"].source.rows(5, 10) if dtype == "fp16" else streamed["neighbors"].rows(5, 10)
