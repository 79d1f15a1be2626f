"""The indexed (whole-slide) layout: parity with the per-item layout, the CLI path, and bad indices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepspot import create_model, save
from deepspot.cli import app
from deepspot.data import check_neighbor_index, densify, save_bundle, synth_slide
from deepspot.errors import CheckpointError, ConfigError, DeepSpotError, InputError
from deepspot.export.indexed import export_indexed
from deepspot.modes import MODES, get_mode
from deepspot.runtime.indexed import load_pipeline, predict_indexed

D, H, G = 12, 6, 4
NEIGHBOR_MODES = [m for m in MODES if m.has_neighbors]
runner = CliRunner()


def _model(mode, agg="max", seed=0):
    extra = {"agg_neighbors": agg} if mode.family == "cell" else {}
    return create_model(mode.family, mode.name, input_size=D, output_size=G, phi2rho_size=H, n_ensemble=5,
                        random_seed=seed, **extra).eval()  # fmt: skip


def _graph(mode, n=37, k=5, seed=0):
    """A random slide with every awkward case: padding, repeats, self-loops, an isolated item, and neighbours that
    lie in other batches (batch size 8 below, items up to n apart)."""
    rng = np.random.default_rng(seed)
    arrays = {mode.bags[0].name: rng.standard_normal((n, D), dtype=np.float32)}
    if "subspot" in mode.input_names:
        arrays["subspot"] = rng.standard_normal((n, 3, D), dtype=np.float32)
    index = rng.integers(-1, n, size=(n, k))
    index[0] = -1  # no neighbours at all
    index[1, :3] = 1  # its own neighbour, three times
    index[2] = [2, 2, 5, 5, -1]  # repeated neighbours and padding
    index[3] = [36, 35, 0, 20, 9]  # neighbours in other batches, both directions
    arrays["neighbor_index"] = index
    return arrays


def _dense_reference(model, arrays):
    own_name = model.mode.bags[0].name
    own = arrays[own_name]
    bags = {own_name: own[:, None, :], "neighbors": densify(own, arrays["neighbor_index"])}
    if "subspot" in arrays:
        bags["subspot"] = arrays["subspot"]
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bags.items()}).numpy()


CASES = [
    pytest.param(mode, agg, id=f"{mode.key}-{agg}")
    for mode in NEIGHBOR_MODES
    for agg in (("max", "mean", "sum") if mode.family == "cell" else ("max",))
]


@pytest.mark.parametrize("mode, agg", CASES)
@pytest.mark.parametrize("backend", ["torch", "ort-cpu"])
def test_indexed_equals_dense(tmp_path, mode, agg, backend):
    model = _model(mode, agg)
    arrays = _graph(mode)
    expected = _dense_reference(model, arrays)
    source = model
    if backend == "ort-cpu":
        source = export_indexed(model, tmp_path / "indexed")
    with load_pipeline(source, backend, batch_size=8) as pipeline:
        got, location = predict_indexed(pipeline, arrays, batch_size=8)
    assert location == "memory"
    tol = 1e-5 * (1 + np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)
    # The isolated item is not the same as an item whose neighbours are real: padding is a real zero row.
    assert not np.allclose(got[0], got[4])


@pytest.mark.parametrize("mode", NEIGHBOR_MODES, ids=lambda m: m.key)
def test_gathering_on_the_device_equals_gathering_on_the_host(mode):
    # The GPU path (table on the device, index in the feed) run on the CPU, where it can be tested.
    from deepspot.runtime.indexed import DeviceGatherHeadRunner, pipeline_from_model

    model = _model(mode)
    arrays = _graph(mode)
    with pipeline_from_model(model, device_gather=True) as pipeline:
        assert isinstance(pipeline.head, DeviceGatherHeadRunner)
        assert "neighbor_index" in pipeline.head.input_names
        got, _ = predict_indexed(pipeline, arrays, batch_size=8)
    with pipeline_from_model(model) as pipeline:
        expected, _ = predict_indexed(pipeline, arrays, batch_size=8)
    np.testing.assert_array_equal(got, expected)


def test_memory_mapped_and_fp16_tables(tmp_path):
    mode = NEIGHBOR_MODES[-1]
    model = _model(mode)
    arrays = _graph(mode)
    expected = _dense_reference(model, arrays)
    with load_pipeline(model, batch_size=8) as p:
        mapped, location = predict_indexed(p, arrays, batch_size=8, table="mmap", table_folder=tmp_path)
    assert location == "mmap" and list(tmp_path.iterdir()) == []  # the table file is gone afterwards
    np.testing.assert_allclose(mapped, expected, rtol=0, atol=1e-5 * (1 + np.abs(expected).max()))
    with load_pipeline(model, batch_size=8, table_dtype="fp16") as p:
        half, _ = predict_indexed(p, arrays, batch_size=8)
    err = np.abs(half - expected).max()
    assert 0 < err <= 5e-3 * (1 + np.abs(expected).max())  # rounded, but within the fp16 tolerance


def test_an_fp16_table_is_held_to_the_fp16_tolerance(tmp_path):
    """An fp32 model with an fp16 table rounds every embedding: export validation and parity use the fp16 row
    (with the fp32 row the export was refused, though within fp16's error)."""
    from deepspot.export.metadata import indexed_precision
    from deepspot.runtime.parity import check_parity_indexed

    mode = NEIGHBOR_MODES[-1]
    model = _model(mode)
    folder = export_indexed(model, tmp_path / "indexed", table_dtype="fp16")  # validated
    ckpt = save(model, tmp_path / "m.safetensors")
    report = check_parity_indexed(ckpt, folder, "ort-cpu", n_random=64)
    assert report.passed and report.precision == "fp16"
    assert report.notes == ["the embedding table is fp16: the fp16 tolerance applies"]
    assert [indexed_precision(p, t) for p, t in [("fp32", "fp32"), ("tf32", "fp16"), ("bf16", "fp16")]] == [
        "fp32", "fp16", "bf16"]  # fmt: skip


@pytest.mark.parametrize("table_dtype", ["fp32", "fp16"])
def test_parity_against_stored_outputs_holds_an_fp16_table_to_the_fp16_tolerance(tmp_path, table_dtype):
    """`parity --expected` on an indexed export (the torch-free check) uses the same tolerance row as parity against
    the checkpoint: with an fp16 table it was the fp32 row, and an export within fp16's error failed."""
    from deepspot.runtime.parity import check_parity_expected

    mode = NEIGHBOR_MODES[-1]
    model = _model(mode)
    arrays = _graph(mode)
    bundle = save_bundle(tmp_path / "slide.npz", arrays)
    np.save(tmp_path / "expected.npy", _dense_reference(model, arrays))
    folder = export_indexed(model, tmp_path / "indexed", table_dtype=table_dtype)
    report = check_parity_expected(folder, tmp_path / "expected.npy", bundle)
    assert report.passed, report.summary()
    assert report.precision == table_dtype
    note = "the embedding table is fp16: the fp16 tolerance applies"
    assert report.notes == ([] if table_dtype == "fp32" else [note])
    if table_dtype == "fp16":
        assert report.outputs[0].max_abs > 1e-5 * (1 + report.outputs[0].reference_max_abs)  # beyond the fp32 row


def _files(tmp_path, mode, n=50):
    model = _model(mode)
    model.genes = [f"g{i}" for i in range(G)]
    ckpt = save(model, tmp_path / "m.safetensors")
    slide = synth_slide(mode.family, n, D, 6, seed=3, n_subspots=3)
    slide = {k: v for k, v in slide.items() if k == "neighbor_index" or k in mode.input_names}
    bundle = save_bundle(tmp_path / "slide.npz", slide)
    return model, ckpt, slide, bundle


def test_cli_takes_the_indexed_path_by_itself(tmp_path):
    mode = NEIGHBOR_MODES[0]
    model, ckpt, slide, bundle = _files(tmp_path, mode)
    folder = tmp_path / "indexed"
    result = runner.invoke(app, ["export", str(ckpt), "--layout", "indexed", "-o", str(folder)])
    assert result.exit_code == 0, result.output
    expected = _dense_reference(model, slide)
    for source, name in ((ckpt, "torch.npy"), (folder, "ort.npy")):
        result = runner.invoke(app, ["infer", str(source), "-i", str(bundle), "-o", str(tmp_path / name),
                                     "--batch-size", "16", "--no-progress"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "indexed layout" in result.output
        np.testing.assert_allclose(np.load(tmp_path / name), expected, rtol=0, atol=2e-5)
    # --layout dense runs the per-item model on the same bundle, gathering the neighbour bags per batch.
    result = runner.invoke(app, ["infer", str(ckpt), "-i", str(bundle), "-o", str(tmp_path / "dense.npz"),
                                 "--layout", "dense", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "dense.npz") as z:
        np.testing.assert_allclose(z["predictions"], expected, rtol=0, atol=2e-5)
        assert list(z["genes"]) == model.genes
    report = tmp_path / "parity.json"
    result = runner.invoke(app, ["parity", str(ckpt), str(folder), "--input", str(bundle), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["passed"] is True


def test_parity_fails_against_another_model(tmp_path):
    mode = NEIGHBOR_MODES[-1]
    _, ckpt, _, _ = _files(tmp_path, mode)
    other = export_indexed(_model(mode, seed=1), tmp_path / "other")
    result = runner.invoke(app, ["parity", str(ckpt), str(other), "--random", "20"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_parity_of_the_indexed_layout_on_a_slide_without_items_exits_2(tmp_path):
    mode = NEIGHBOR_MODES[0]
    _, ckpt, slide, _ = _files(tmp_path, mode)
    empty = save_bundle(tmp_path / "empty.npz", {k: v[:0] for k, v in slide.items()})
    result = runner.invoke(app, ["parity", str(ckpt), str(ckpt), "--input", str(empty), "--layout", "indexed"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith("Error: ") and "empty.npz: has no items" in result.output


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda i: i.__setitem__((7, 2), 50), "'neighbor_index' row 7 holds 50, out of range"),
        (lambda i: i.__setitem__((9, 0), -2), "'neighbor_index' row 9 holds -2, below -1"),
    ],
)
def test_bad_indices_name_the_first_offending_row(tmp_path, edit, message):
    mode = NEIGHBOR_MODES[-1]
    _, ckpt, slide, _ = _files(tmp_path, mode)
    edit(slide["neighbor_index"])
    bundle = save_bundle(tmp_path / "bad.npz", slide)
    out = tmp_path / "out.npy"
    result = runner.invoke(app, ["infer", str(ckpt), "-i", str(bundle), "-o", str(out), "--no-progress"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "m.safetensors", "slide.npz"]


def test_index_checks():
    index = np.zeros((4, 3), dtype=np.int64)
    assert check_neighbor_index(index, 4, k=3).dtype == np.int64
    with pytest.raises(InputError, match=r"must be an integer array, got float64 \(row 2 is not integral\)"):
        bad = index.astype(np.float64)
        bad[2, 1] = 0.5
        check_neighbor_index(bad, 4)
    with pytest.raises(InputError, match="has 3 rows, the bundle has 4 items"):
        check_neighbor_index(index[:3], 4)
    with pytest.raises(InputError, match="K=3 neighbours, the model expects 6"):
        check_neighbor_index(index, 4, k=6)
    with pytest.raises(InputError, match=r"must have shape \(N, K\)"):
        check_neighbor_index(index[:, 0], 4)


def test_layouts_that_cannot_run(tmp_path):
    spot_only = create_model("spot", "subspot", input_size=D, output_size=G, phi2rho_size=H, n_ensemble=3)
    with pytest.raises(ConfigError, match="has no neighbours, so it has no indexed layout"):
        export_indexed(spot_only, tmp_path / "x")
    mode = NEIGHBOR_MODES[-1]
    a = export_indexed(_model(mode), tmp_path / "a")
    b = export_indexed(_model(mode, seed=2), tmp_path / "b")
    (a / "head.onnx").write_bytes((b / "head.onnx").read_bytes())
    with pytest.raises(CheckpointError, match="come from different exports"):
        load_pipeline(a)
    with pytest.raises(DeepSpotError, match="already exists"):
        export_indexed(_model(mode), tmp_path / "b")


def test_slide_generators():
    spots = synth_slide("spot", 60, 4, 6, seed=0)
    index = spots["neighbor_index"]
    degree = (index >= 0).sum(axis=1)
    assert degree.max() == 6 and degree.min() >= 2  # hexagonal: 6 inside, fewer at the border (padded with -1)
    pairs = {(i, j) for i in range(60) for j in index[i] if j >= 0}
    assert all((j, i) in pairs for i, j in pairs)  # adjacency is symmetric
    cells = synth_slide("cell", 100, 4, 44, seed=0)["neighbor_index"]
    assert cells.shape == (100, 44) and not (cells == np.arange(100)[:, None]).any()  # the cell itself excluded


def test_a_gpu_slide_benchmark_sets_the_gpu_backends_beside_eager_pytorch_on_the_gpu():
    from deepspot.runtime.slide_bench import baseline_device

    assert baseline_device(on_gpu=True, torch_cuda=True) == "cuda"
    assert baseline_device(on_gpu=False, torch_cuda=True) == "cpu"
    assert baseline_device(on_gpu=True, torch_cuda=False) == "cpu"  # a CPU build of PyTorch: named so in the report


def test_quick_slide_benchmark_reports_ratios():
    from deepspot.runtime.bench import run_bench

    report = run_bench("xenium-slide", ["torch", "ort-cpu"], repeats=1, warmup=0, quick=True, n_items=300)
    names = [r.backend for r in report.results]
    assert names[0] == "torch (eager, per-item)" and any("indexed" in n for n in names[1:])
    assert report.baseline == names[0] and report.results[0].device == "cpu"
    assert all(r.items_per_s > 0 and r.ratio_to_torch > 0 for r in report.results)
    assert report.workload["n_items"] == 300
    for r in report.results[1:]:  # each pass of the indexed layout, timed: what bounds a slide
        assert set(r.phases_s) == {"encoder", "table", "head"}
        assert r.phases_s["encoder"] > 0 and r.phases_s["head"] > 0 and r.phases_s["table"] >= 0
        assert sum(r.phases_s.values()) <= r.p95_ms / 1e3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", NEIGHBOR_MODES, ids=lambda m: m.key)
def test_indexed_on_cuda_equals_dense(require, mode):
    require("cuda")
    model = _model(mode)
    arrays = _graph(mode)
    expected = _dense_reference(model, arrays)
    with load_pipeline(model, "torch-cuda", batch_size=8) as pipeline:
        got, _ = predict_indexed(pipeline, arrays, batch_size=8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * (1 + np.abs(expected).max()))


def test_slide_benchmark_times_the_cli_beside_the_in_process_run(tmp_path):
    from typer.testing import CliRunner

    from deepspot.cli import app
    from deepspot.errors import ConfigError
    from deepspot.runtime.bench import run_bench

    report = run_bench("xenium-slide", ["ort-cpu"], repeats=1, warmup=0, quick=True, n_items=300, cli=True)
    names = [r.backend for r in report.results]
    assert names[1].startswith("ort-cpu (indexed") and names[2] == "ort-cpu (CLI: deepspot infer, start-up included)"
    cli_row, inside = report.results[2], report.results[1]
    assert 0 < cli_row.items_per_s and len(cli_row.repeats_items_per_s) == 1 and cli_row.peak_rss_mb > 0
    assert cli_row.p50_ms > 0 and cli_row.flops_per_item == inside.flops_per_item
    with pytest.raises(ConfigError, match="whole slide"):
        run_bench("xenium", ["ort-cpu"], quick=True, cli=True)
    # Per-item workloads: "of GEMM" counts what each backend computes (eager: every Rho; ONNX: the folded graph).
    per_item = run_bench("xenium", ["ort-cpu"], repeats=1, warmup=0, quick=True)
    assert per_item.result("torch").flops_per_item == per_item.flops_per_item
    assert per_item.result("ort-cpu").flops_per_item == per_item.flops_per_item_folded
    ort = per_item.result("ort-cpu")
    assert ort.fraction_of_gemm == pytest.approx(ort.fraction_of_bound)
    result = CliRunner().invoke(app, ["bench", "--workload", "xenium-slide", "--quick", "--items", "200", "--repeats",
                                      "1", "--warmup", "0", "--backends", "ort-cpu", "--cli"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "end to end" in result.output and "of the in-process rate" in result.output


@pytest.mark.parametrize("backend", ["torch", "ort-cpu"])
def test_max_pooling_while_gathering_keeps_nan_like_torch(tmp_path, backend):
    # The host gather max-pools the neighbours itself (np.maximum, which propagates NaN as torch.amax does).
    mode = get_mode("cell", "neighbors")
    model = _model(mode, "max")
    arrays = _graph(mode)
    arrays["cell"][5, 2] = np.nan  # item 5's embedding is NaN: every item with 5 among its neighbours predicts NaN
    expected = _dense_reference(model, arrays)
    source = export_indexed(model, tmp_path / "indexed") if backend == "ort-cpu" else model
    with load_pipeline(source, backend, batch_size=8) as pipeline:
        got, _ = predict_indexed(pipeline, arrays, batch_size=8)
    hit = (arrays["neighbor_index"] == 5).any(axis=1)
    assert hit.sum() >= 2 and np.isnan(expected[hit]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-5 * (1 + np.abs(expected[finite]).max()))


def test_fp16_io_is_refused_by_the_torch_indexed_pipeline_not_ignored():
    from deepspot.errors import ConfigError
    from deepspot.runtime import RunnerOptions

    model = _model(NEIGHBOR_MODES[-1])
    with pytest.raises(ConfigError, match="io=fp16 is for the dense layout"):
        load_pipeline(model, "torch", RunnerOptions(io="fp16"))


@pytest.mark.parametrize("layout", ["indexed", "dense"])
def test_a_small_integer_index_type_gives_the_same_predictions(layout):
    """A uint8 index of a 256-item slide holds 255, which ``+ 1`` (row 0 of the table is the zero row) would wrap to
    0 in its own type: indices are widened to int64 before any arithmetic."""
    mode = get_mode("cell", "neighbors")
    model = _model(mode)
    arrays = _graph(mode, n=256)
    arrays["neighbor_index"][arrays["neighbor_index"] < 0] = 255
    arrays["neighbor_index"][:, 0] = 255
    expected = _dense_reference(model, arrays)
    small = dict(arrays, neighbor_index=arrays["neighbor_index"].astype(np.uint8))
    if layout == "indexed":
        with load_pipeline(model, "torch", batch_size=64) as pipeline:
            out, _ = predict_indexed(pipeline, small, batch_size=64, table="memory")
    else:
        from deepspot.runtime import load_runner, predict
        from deepspot.runtime.indexed import dense_from_index

        inputs, gather = dense_from_index(small, mode)
        with load_runner(model, "torch") as r:
            out = predict(r, inputs, 64, prepare=gather)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_an_indexed_export_on_a_bundle_of_neighbour_features_says_what_to_do(tmp_path):
    """The advice must not go in circles: --layout dense cannot run an indexed export, so the message says to build
    the bundle with --index, or to run the per-item export."""
    mode = NEIGHBOR_MODES[0]
    model, ckpt, slide, bundle = _files(tmp_path, mode)
    folder = export_indexed(model, tmp_path / "indexed")
    dense = {k: v for k, v in slide.items() if k != "neighbor_index"}
    dense["neighbors"] = densify(slide[mode.bags[0].name], slide["neighbor_index"])
    save_bundle(tmp_path / "dense.npz", dense)
    args = ["infer", str(folder), "-i", str(tmp_path / "dense.npz"), "-o", str(tmp_path / "p.npy")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    advice = "which takes neighbour indices: build the bundle with deepspot bundle --index, or run the per-item .onnx"
    assert advice in result.output
    assert not (tmp_path / "p.npy").exists()


def _rss_file_kib() -> int:
    import re

    return int(re.search(r"RssFile:\s+(\d+)", open("/proc/self/status").read()).group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
def test_gathering_bags_from_a_npz_bundle_reads_only_the_rows_it_gathers(tmp_path):
    """A .npz member memory-mapped in place is not aligned, and np.take on it copied the whole array on every batch
    (0.16 s a batch for 80,000 x 1,024 features: quadratic in the slide) and made all of it resident."""
    from deepspot.data import load_bundle
    from deepspot.modes import get_mode
    from deepspot.runtime.indexed import dense_from_index

    n, d = 16_384, 1024  # 64 MiB of features
    np.savez(tmp_path / "b.npz", cell=np.ones((n, 1, d), dtype=np.float32),
             neighbor_index=np.tile(np.arange(-1, 7), (n, 1)))  # fmt: skip
    arrays = load_bundle(tmp_path / "b.npz").arrays
    assert not arrays["cell"].flags.aligned  # what np.savez gives: the case that was slow
    _, gather = dense_from_index(arrays, get_mode("cell", "neighbors"))
    before = _rss_file_kib()
    feed = gather(0, 256, {"neighbor_index": np.array(arrays["neighbor_index"][:256])})
    grown = _rss_file_kib() - before
    assert feed["neighbors"].shape == (256, 8, d) and (feed["neighbors"][:, 0] == 0).all()
    assert (feed["neighbors"][:, 1:] == 1).all()
    assert grown < 16 << 10, f"gathering 8 rows made {grown} KiB of the 64 MiB bundle resident"
