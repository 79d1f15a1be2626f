"""The runner contract, run over every backend in the registry (GPU backends skip cleanly without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from deepspot.errors import InputError
from deepspot.runtime import BACKENDS, Runner, RunnerOptions, load_runner
from deepspot.runtime.parity import tolerance_for

MARKS = {
    "torch-cuda": pytest.mark.gpu,
    "ort-cuda": pytest.mark.gpu,
    "ort-trt": [pytest.mark.gpu, pytest.mark.tensorrt],
    "tensorrt": [pytest.mark.gpu, pytest.mark.tensorrt],
}
NEEDS = {"torch-cuda": "cuda", "ort-cuda": "ort-cuda", "ort-trt": "ort-trt", "tensorrt": "tensorrt"}
BACKEND_PARAMS = [pytest.param(name, id=name, marks=MARKS.get(name, ())) for name in BACKENDS]


def test_every_backend_is_covered_by_the_contract_test():
    assert {p.values[0] for p in BACKEND_PARAMS} == set(BACKENDS)
    assert {"torch", "torch-cuda", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt"} <= set(BACKENDS)


@pytest.fixture
def runner_for(artifacts, require, tmp_path):
    def build(backend: str, family: str = "spot", mode: str = "subspot_neighbors"):
        if backend in NEEDS:
            require(NEEDS[backend])
        a = artifacts(family, mode)
        source = a.checkpoint if BACKENDS[backend].runs == "model" else a.onnx
        options = RunnerOptions(batch_size=16, bag_sizes={"subspot": 3, "neighbors": 4}, cache_dir=tmp_path)
        return a, load_runner(source, backend, options)

    return build


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_runner_contract(runner_for, eager, backend):
    a, runner = runner_for(backend)
    assert isinstance(runner, Runner) and not runner.is_active
    assert runner.selection.backend == backend and not runner.selection.fell_back
    feed = {k: v[:11] for k, v in a.inputs().items()}
    with pytest.raises(RuntimeError, match="activate"):
        runner.infer(feed)

    with runner as active:
        assert active is runner and runner.is_active
        assert runner.input_names == a.model.mode.input_names
        assert runner.output_names == ("expression",)
        assert runner.device.startswith("cuda" if BACKENDS[backend].device == "cuda" else "cpu")
        info = runner.info
        assert (info.family, info.mode, info.input_size, info.output_size) == ("spot", "subspot_neighbors", 16, 5)
        assert info.genes == a.model.genes and info.scaler is not None

        out = runner.infer(feed)
        assert set(out) == {"expression"}
        y = out["expression"]
        assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (11, 5)
        expected = eager(a.model, feed)
        tol = tolerance_for(info.precision)
        assert np.abs(y - expected).max() <= tol.limit(np.abs(expected).max())

        # A different batch size in the same session.
        assert runner.infer({k: v[:3] for k, v in feed.items()})["expression"].shape == (3, 5)
        with pytest.raises(InputError, match="missing input 'neighbors'"):
            runner.infer({k: v for k, v in feed.items() if k != "neighbors"})
        with pytest.raises(InputError, match="rank"):  # (N, D) is a single tile, as in a bundle; (N,) is not
            runner.infer({**feed, "spot": feed["spot"][:, 0, 0]})
        assert runner.last_inference_time is not None and runner.last_inference_time >= 0
    assert not runner.is_active
    runner.deactivate()  # idempotent


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.values[0] in ("torch", "ort-cpu")])
def test_runner_takes_float64_and_non_contiguous_feeds(runner_for, eager, backend):
    a, runner = runner_for(backend)
    feed = {k: np.asfortranarray(v[:6].astype(np.float64)) for k, v in a.inputs().items()}
    with runner:
        y = runner.infer(feed)["expression"]
    np.testing.assert_allclose(y, eager(a.model, feed), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "ort-cpu"])
def test_infer_takes_what_a_bundle_takes(runner_for, backend):
    # A single tile as (N, D), and float64 cast to the graph's float32 with a check: as `deepspot infer` on a bundle.
    a, runner = runner_for(backend)
    arrays = {k: v[:8] for k, v in a.arrays.items() if k in ("spot", "subspot", "neighbors")}
    canonical = {
        k: np.ascontiguousarray(v[:, None, :] if v.ndim == 2 else v, dtype=np.float32) for k, v in arrays.items()
    }
    assert arrays["spot"].ndim == 2
    with runner:
        want = runner.infer(canonical)["expression"]
        got = runner.infer({k: v.astype(np.float64) for k, v in arrays.items()})["expression"]
        np.testing.assert_array_equal(got, want)
        huge = {k: v.astype(np.float64) for k, v in arrays.items()}
        huge["subspot"][5, 0, 0] = 1e300  # finite in float64, inf in float32
        with pytest.raises(InputError, match=r"'subspot' holds a value beyond float32's range \(it would .* row 5"):
            runner.infer(huge)
        with pytest.raises(InputError, match="'spot' must be floating point"):
            runner.infer({**canonical, "spot": canonical["spot"].astype(np.int32)})


@pytest.mark.parametrize("backend", ["torch", "ort-cpu"])
def test_feed_mistakes_are_named_input_errors(runner_for, backend):
    # onnxruntime failed in a Reshape node on an empty bag (and logged a block of its own); a non-mapping feed and a
    # tensor that requires grad raised errors about dict updates and tensors, not about the feed.
    torch = pytest.importorskip("torch")
    a, runner = runner_for(backend)
    feed = {k: np.ascontiguousarray(v[:4]) for k, v in a.inputs().items()}
    with runner:
        with pytest.raises(InputError, match=r"input 'subspot' has an empty bag, shape \(4, 0, 16\)"):
            runner.infer({**feed, "subspot": feed["subspot"][:, :0]})
        with pytest.raises(InputError, match="the feed must map input names to arrays .spot, subspot, neighbors., not"):
            runner.infer(feed["spot"])
        grad = torch.from_numpy(feed["spot"]).requires_grad_()
        with pytest.raises(InputError, match=r"input 'spot' is no array NumPy can read .*t.detach\(\).cpu\(\)"):
            runner.infer({**feed, "spot": grad})
        np.testing.assert_array_equal(runner.infer({**feed, "spot": torch.from_numpy(feed["spot"])})["expression"],
                                      runner.infer(feed)["expression"])  # fmt: skip
        assert runner.infer({k: v[:0] for k, v in feed.items()})["expression"].shape == (0, 5)
