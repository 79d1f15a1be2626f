"""GPU paths: torch on CUDA, onnxruntime's CUDA and TensorRT providers, native TensorRT engines.

Every test is marked ``gpu`` (and ``tensorrt`` where it needs it) and skips with the reason where the hardware or the
package is missing. No module here imports ``tensorrt`` at top level.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepspot.runtime import RunnerOptions, check_parity, load_runner
from deepspot.runtime.bench import run_bench

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cuda_parity(artifacts, require, precision):
    require("cuda")
    a = artifacts()
    report = check_parity(
        a.checkpoint, a.checkpoint, "torch-cuda", bundle=a.bundle, options=RunnerOptions(precision=precision)
    )
    assert report.passed, report.summary()
    assert report.precision == precision


def test_torch_cuda_streams_a_bundle(artifacts, eager, require, tmp_path):
    require("cuda")
    from deepspot.runtime import infer

    a = artifacts("cell", "neighbors")
    result = infer(a.checkpoint, a.bundle, tmp_path / "p.npy", "torch-cuda", batch_size=8)
    assert result.backend == "torch-cuda"
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), eager(a.model, a.inputs()), atol=1e-4)


def test_torch_cuda_bench_quick(require):
    require("cuda")
    report = run_bench("visium-uni", ["torch-cuda"], repeats=2, warmup=1, quick=True)
    assert report.result("torch-cuda").ratio_to_torch > 0


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_io_binding_and_cuda_graphs(artifacts, eager, require, cuda_graph):
    require("ort-cuda")
    a = artifacts()
    runner = load_runner(a.onnx, "ort-cuda", RunnerOptions(cuda_graph=cuda_graph, batch_size=8))
    inputs = a.inputs()
    with runner:
        for start in (0, 8, 16, 32):  # the last batch is short: padded under a CUDA graph
            feed = {k: v[start : start + 8] for k, v in inputs.items()}
            y = runner.infer(feed)["expression"]
            np.testing.assert_allclose(y, eager(a.model, feed), atol=1e-4)
        on_device = runner.infer_on_device({k: v[:8] for k, v in inputs.items()})
        assert on_device["expression"].device_name().lower() == "cuda"


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ort_trt_parity_and_engine_cache(artifacts, require, tmp_path, precision):
    require("ort-trt")
    a = artifacts()
    options = RunnerOptions(
        precision=precision, cache_dir=tmp_path, batch_size=16, bag_sizes={"subspot": 3, "neighbors": 4}
    )
    assert check_parity(a.checkpoint, a.onnx, "ort-trt", bundle=a.bundle, batch_size=16, options=options).passed
    assert any((tmp_path / "ort-trt").rglob("*.engine"))


@pytest.mark.tensorrt
def test_native_tensorrt_engine_build_run_and_checks(artifacts, require, tmp_path):
    require("tensorrt")
    from deepspot.errors import CheckpointError
    from deepspot.runtime.trt import TrtRunner, engine_from_onnx, read_plan_header

    a = artifacts()
    plan = engine_from_onnx(a.onnx, tmp_path / "m.plan", "fp32", max_batch=16, bag_sizes={"subspot": 3, "neighbors": 4})
    header, _ = read_plan_header(plan)
    assert header["model"]["family"] == "spot" and header["onnx_sha256"]
    assert check_parity(a.checkpoint, plan, "tensorrt", bundle=a.bundle, batch_size=16).passed
    with pytest.raises(CheckpointError, match="onnx_sha256"):
        TrtRunner(plan, onnx_path=artifacts("cell", "neighbors").onnx).activate()


@pytest.mark.gpu
def test_ort_cuda_fp32_is_fp32_and_tf32_is_asked_for(artifacts, require):
    """onnxruntime's CUDA provider would run fp32 products at TF32 by default; deepspot turns that off unless asked."""
    require("ort-cuda")
    a = artifacts()
    strict = check_parity(a.checkpoint, a.onnx, "ort-cuda", bundle=a.bundle, batch_size=16)
    assert strict.passed and strict.precision == "fp32"
    tf32 = check_parity(a.checkpoint, a.onnx, "ort-cuda", bundle=a.bundle, batch_size=16,
                        options=RunnerOptions(tf32=True))  # fmt: skip
    assert tf32.passed and tf32.precision == "tf32"
