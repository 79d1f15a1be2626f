"""Parity reports: pass for onnxruntime fp32, fail (with the measured error and the limit) when something is off."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepspot import checkpoint
from deepspot.errors import ConfigError
from deepspot.runtime import TOLERANCES, RunnerOptions, check_parity, compare, load_runner
from deepspot.runtime.parity import Tolerance, output_parity, pearson_per_column, random_inputs, tolerance_for


def test_tolerance_table_is_data_for_every_precision():
    assert set(TOLERANCES) == {"fp32", "tf32", "fp16", "bf16"}
    order = [TOLERANCES[p] for p in ("fp32", "tf32", "fp16", "bf16")]  # from the finest to the coarsest
    assert all(a.atol < b.atol and a.min_pearson > b.min_pearson for a, b in zip(order, order[1:]))
    assert tolerance_for("fp16", atol=0.5) == Tolerance(0.5, TOLERANCES["fp16"].rtol, TOLERANCES["fp16"].min_pearson)
    with pytest.raises(ConfigError, match="no tolerance for precision 'int8'"):
        tolerance_for("int8")


@pytest.mark.parametrize(("family", "mode"), [("spot", "subspot_neighbors"), ("cell", "neighbors")])
def test_ort_cpu_fp32_passes_on_a_bundle_and_on_random_inputs(artifacts, tmp_path, family, mode):
    a = artifacts(family, mode)
    report = check_parity(a.checkpoint, a.onnx, "ort-cpu", bundle=a.bundle, batch_size=16)
    assert report.passed and report.n == 37 and report.precision == "fp32"
    (o,) = report.outputs
    assert o.name == "expression" and o.shape == (37, 5)
    assert 0 <= o.mean_abs <= o.max_abs <= o.limit and o.min_pearson > 0.99999 and o.worst_gene in range(5)
    report = check_parity(a.checkpoint, a.onnx, n_random=20)
    assert report.passed and report.n == 20
    path = report.save(tmp_path / "parity.json")
    saved = json.loads(path.read_text())
    assert saved["passed"] is True and saved["outputs"][0]["tolerance"]["atol"] == TOLERANCES["fp32"].atol


def test_torch_variants_pass_against_the_reference(artifacts):
    a = artifacts()
    assert check_parity(a.checkpoint, a.checkpoint, "torch", n_random=16).passed
    fused = check_parity(a.checkpoint, a.checkpoint, "torch", n_random=16, options=RunnerOptions(torch_graph="export"))
    assert fused.passed and fused.outputs[0].max_abs > 0  # a different summation order, within the fp32 tolerance
    for options in (RunnerOptions(precision="bf16"), RunnerOptions(precision="bf16", torch_graph="export")):
        report = check_parity(a.checkpoint, a.checkpoint, "torch", n_random=16, options=options)
        assert report.passed and report.precision == "bf16"


def test_a_different_checkpoint_fails(artifacts, make_model, tmp_path):
    a = artifacts()
    other = checkpoint.save(make_model("spot", "subspot_neighbors", seed=7), tmp_path / "other.safetensors")
    report = check_parity(other, a.onnx, n_random=16)
    assert not report.passed
    (o,) = report.outputs
    assert o.max_abs > o.limit and "FAIL" in o.describe() and f"limit {o.limit:.3g}" in o.describe()


def test_a_corrupted_graph_fails(artifacts, tmp_path):
    import onnx
    from onnx import numpy_helper

    a = artifacts()
    graph = onnx.load(str(a.onnx))
    biggest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(biggest).copy()
    values.flat[::7] += 0.05  # a few weights nudged, as a bit flip or a wrong conversion would
    biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
    onnx.save(graph, str(tmp_path / "corrupt.onnx"))
    assert not check_parity(a.checkpoint, tmp_path / "corrupt.onnx", n_random=32).passed


def test_too_tight_a_tolerance_fails(artifacts):
    a = artifacts()
    report = check_parity(a.checkpoint, a.onnx, n_random=32, atol=0.0, rtol=0.0)
    assert report.outputs[0].max_abs > 0 and not report.passed


def test_a_model_of_another_mode_is_refused(artifacts):
    with pytest.raises(ConfigError, match="spot/subspot_neighbors .* but .* cell/neighbors"):
        check_parity(artifacts("cell", "neighbors").checkpoint, artifacts().onnx, n_random=4)


def test_nan_never_passes_and_shape_mismatch_fails():
    ref = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    bad = ref.copy()
    bad[4, 1] = np.nan
    assert not output_parity("y", bad, ref, TOLERANCES["fp32"]).passed
    assert not output_parity("y", ref[:, :2], ref, TOLERANCES["fp32"]).passed
    assert output_parity("y", ref, ref, TOLERANCES["fp32"]).passed


def test_pearson_per_gene_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    b[:, 3] = 2.0  # a constant reference gene has no correlation: NaN, not a failure
    r = pearson_per_column(a, b)
    for j in range(3):
        assert r[j] == pytest.approx(np.corrcoef(a[:, j], b[:, j])[0, 1])
    assert np.isnan(r[3])


def test_compare_with_a_list_of_feeds(artifacts):
    a = artifacts()
    inputs = random_inputs(load_runner(a.checkpoint).info, 12, {"subspot": 3, "neighbors": 4}, seed=3)
    assert (inputs["neighbors"][0, -1] == 0).all()  # the reference's zero padding is part of the inputs
    feeds = [{k: v[:5] for k, v in inputs.items()}, {k: v[5:] for k, v in inputs.items()}]
    report = compare(load_runner(a.checkpoint), load_runner(a.onnx), feeds)
    assert report.passed and report.n == 12 and "PASS" in report.summary()


def _tf32(t):
    """Round to TF32 (a 10-bit mantissa, to nearest) as the tensor cores read their operands."""
    import torch

    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_misses_the_fp32_tolerance_and_meets_its_own(monkeypatch):
    """Why ort-cuda and TensorRT are told use_tf32=0 by default, and what the tf32 row allows: TF32 products emulated
    on the CPU, on a model of realistic width."""
    import torch
    import torch.nn.functional as F

    from deepspot.factory import create_model
    from deepspot.runtime.torch_runner import TorchRunner

    model = create_model("spot", "subspot_neighbors", input_size=512, output_size=200, phi2rho_size=256,
                         n_ensemble=10, random_seed=0).eval()  # fmt: skip
    with TorchRunner(model) as runner:
        inputs = random_inputs(runner.info, 64, seed=0)
        feed = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            fp32 = model(**feed).numpy()
            real = F.linear
            monkeypatch.setattr(F, "linear", lambda x, w, b=None: real(_tf32(x), _tf32(w), b))
            tf32 = model(**feed).numpy()
    assert not output_parity("expression", tf32, fp32, tolerance_for("fp32")).passed
    assert output_parity("expression", tf32, fp32, tolerance_for("tf32")).passed
    assert not output_parity("expression", tf32 + 0.01 * np.abs(fp32).max(), fp32, tolerance_for("tf32")).passed


def test_parity_against_stored_outputs_with_tf32_uses_the_tf32_row(artifacts, eager, tmp_path, monkeypatch):
    """`parity --expected --tf32` holds the run to the tf32 row, as parity against the checkpoint does (it used the
    fp32 row, which TF32 products miss). The GPU run is stood in for by predictions off by TF32's error."""
    import importlib

    from deepspot.runtime.parity import check_parity_expected

    infer_module = importlib.import_module("deepspot.runtime.infer")  # the module (the package exports the function)

    a = artifacts("cell", "neighbors")
    cell = a.arrays["cell"].reshape(len(a.arrays["cell"]), 1, -1)
    expected = eager(a.model, {"cell": cell, "neighbors": a.arrays["neighbors"]})
    np.save(tmp_path / "expected.npy", expected)

    def tf32_run(model, bundle, output, backend, batch_size, options, *args, **kwargs):
        np.save(output, expected + 1e-3 * np.abs(expected).max())  # within tf32's 2e-3, far beyond fp32's 1e-5
        return infer_module.InferResult(output, len(expected), expected.shape[1], 1.0, 1.0, "ort-cuda", "ort-cuda",
                                        batch_size, False)  # fmt: skip

    monkeypatch.setattr(infer_module, "infer", tf32_run)
    report = check_parity_expected(a.onnx, tmp_path / "expected.npy", a.bundle, "ort-cuda",
                                   options=RunnerOptions(tf32=True))  # fmt: skip
    assert report.precision == "tf32" and report.passed, report.summary()
    assert not check_parity_expected(a.onnx, tmp_path / "expected.npy", a.bundle, "ort-cuda",
                                     options=RunnerOptions(tf32=False)).passed  # fmt: skip

    def fallback_run(model, bundle, output, backend, batch_size, options, *args, **kwargs):
        np.save(output, expected + 1e-3 * np.abs(expected).max())
        return infer_module.InferResult(output, len(expected), expected.shape[1], 1.0, 1.0, "ort-cpu", "ort-cuda",
                                        batch_size, False)  # fmt: skip

    # fallen back to the CPU, the run had no TF32 products: the fp32 row holds it
    monkeypatch.setattr(infer_module, "infer", fallback_run)
    report = check_parity_expected(a.onnx, tmp_path / "expected.npy", a.bundle, "ort-cuda", options=RunnerOptions(
        tf32=True), allow_fallback=True)  # fmt: skip
    assert report.precision == "fp32" and not report.passed


def _unchunked(actual, expected, tolerance):
    """What output_parity computed before it went block by block: whole float64 copies."""
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    return diff.max(), diff.mean(), (diff / (np.abs(expected) + tolerance.atol)).max(), np.abs(expected).max()


def test_output_parity_block_by_block_matches_the_whole_array(monkeypatch):
    import deepspot.runtime.parity as parity

    rng = np.random.default_rng(5)
    want = rng.normal(size=(103, 7)).astype(np.float32)
    got = (want + rng.normal(scale=1e-6, size=want.shape)).astype(np.float32)
    tol = TOLERANCES["fp32"]
    whole = output_parity("y", got, want, tol)
    monkeypatch.setattr(parity, "COMPARE_CHUNK_BYTES", 7 * 8 * 2 * 10)  # blocks of 10 rows, the last one short
    blocks = output_parity("y", got, want, tol)
    max_abs, mean_abs, max_rel, ref_max = _unchunked(got, want, tol)
    for r in (whole, blocks):
        assert r.max_abs == pytest.approx(max_abs) and r.mean_abs == pytest.approx(mean_abs)
        assert r.max_rel == pytest.approx(max_rel) and r.reference_max_abs == pytest.approx(ref_max)
        for j in range(7):
            assert pearson_per_column(got, want)[j] == pytest.approx(np.corrcoef(got[:, j], want[:, j])[0, 1])
    assert blocks.min_pearson == pytest.approx(whole.min_pearson) and blocks.worst_gene == whole.worst_gene
    bad = got.copy()
    bad[57, 3] = np.nan  # in a later block: still never passes
    assert np.isnan(output_parity("y", bad, want, tol).max_abs) and not output_parity("y", bad, want, tol).passed


def test_parity_against_stored_outputs_makes_no_whole_float64_copy(tmp_path, monkeypatch):
    """A slide's predictions (500,000 x 5,000 float32 is 10 GB) are compared block by block from memory maps: the
    comparison allocates a few blocks, never a float64 copy of an operand (which took 10x the outputs' size)."""
    import tracemalloc

    import deepspot.runtime.parity as parity

    n, g = 4000, 500  # 8 MB of float32 per operand, 16 MB as float64
    rng = np.random.default_rng(0)
    np.save(tmp_path / "want.npy", rng.normal(size=(n, g)).astype(np.float32))
    np.save(tmp_path / "got.npy", np.load(tmp_path / "want.npy") + np.float32(1e-6))
    monkeypatch.setattr(parity, "COMPARE_CHUNK_BYTES", 256 << 10)
    tracemalloc.start()
    try:
        want = parity.load_expected(tmp_path / "want.npy")  # memory-mapped, checked for NaN block by block
        got = np.load(tmp_path / "got.npy", mmap_mode="r")
        report = output_parity("y", got, want, TOLERANCES["fp32"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(want, np.memmap) and report.passed
    assert peak < n * g * 4 / 2, f"the comparison allocated {peak / 2**20:.1f} MiB for 8 MB operands"


def test_check_parity_s_errors_name_its_arguments_from_python_and_its_flags_from_the_command_line(artifacts):
    from typer.testing import CliRunner

    from deepspot.cli import app

    from _cli import error_line

    a = artifacts()
    with pytest.raises(ConfigError) as e:
        check_parity(a.checkpoint, a.onnx, atol=-1)
    assert str(e.value) == "atol must be a finite number of at least 0, got -1.0"
    with pytest.raises(ConfigError) as e:
        check_parity(a.checkpoint, a.onnx, n_random=0)
    assert str(e.value) == "n_random must be at least 1, got 0"
    cli = CliRunner()
    result = cli.invoke(app, ["parity", str(a.checkpoint), str(a.onnx), "--atol", "-1"])
    assert error_line(result) == "Error: --atol must be a finite number of at least 0, got -1.0"
    result = cli.invoke(app, ["parity", str(a.checkpoint), str(a.onnx), "--random", "0"])
    assert error_line(result) == "Error: --random must be at least 1, got 0"
