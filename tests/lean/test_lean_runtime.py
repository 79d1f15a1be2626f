"""The serving install: running exported models needs no PyTorch (CI runs this folder in a venv without it).

Fixtures: tests/data (tests/data/make_fixtures.py): a tiny spot/subspot_neighbors export per item and in the indexed
layout, a 40-spot slide as neighbour copies and by index, and the eager PyTorch model's predictions on it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deepspot.cli import app

DATA = Path(__file__).resolve().parents[1] / "data"
ONNX, INDEXED = DATA / "spot.onnx", DATA / "spot-indexed"
SLIDE, SLIDE_INDEX = DATA / "slide.npz", DATA / "slide-index.npz"
EXPECTED, EXPECTED_ORIGINAL = DATA / "expected.npy", DATA / "expected-original.npy"
FP32_LIMIT = 1e-5  # the parity table's fp32 row: 1e-5 + 1e-5 x max|ref| (|ref| < 5 here)

cli = CliRunner()


def run(*args):
    return cli.invoke(app, [str(a) for a in args])


def no_torch(*argv: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter where ``import torch`` fails, as on a serving install."""
    code = "import sys; sys.modules['torch'] = None; from deepspot.cli import main; sys.argv = sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, "deepspot", *map(str, argv)], capture_output=True, text=True)


def read_predictions(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["predictions"]
    if path.suffix == ".h5ad":
        import anndata

        return np.asarray(anndata.read_h5ad(path).X)
    return np.load(path)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5ad"])
@pytest.mark.parametrize(
    "model, bundle, layout",
    [(ONNX, SLIDE, None), (INDEXED, SLIDE_INDEX, None), (ONNX, SLIDE_INDEX, "dense")],
    ids=["dense", "indexed", "dense-graph-on-index"],
)
def test_infer_without_torch_matches_the_eager_model(tmp_path, model, bundle, layout, suffix):
    out = tmp_path / f"pred{suffix}"
    extra = ["--layout", layout] if layout else []
    result = no_torch("infer", model, "-i", bundle, "-o", out, "--no-progress", *extra)
    assert result.returncode == 0, result.stderr
    got, want = read_predictions(out), np.load(EXPECTED)
    assert got.shape == want.shape == (40, 5)
    assert np.abs(got - want).max() <= FP32_LIMIT


def test_indexed_table_on_the_device_without_torch(tmp_path):
    # ort-cuda's path (the head gathers from a table bound once), here on ort-cpu: onnx and onnxruntime only.
    out = tmp_path / "pred.npy"
    result = no_torch("infer", INDEXED, "-i", SLIDE_INDEX, "-o", out, "--table", "device", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "table on the device" in result.stdout
    assert np.abs(np.load(out) - np.load(EXPECTED)).max() <= FP32_LIMIT


def test_infer_inverse_transform_uses_the_stored_scaler(tmp_path):
    result = run("infer", ONNX, "-i", SLIDE, "-o", tmp_path / "p.npy", "--no-progress", "--inverse-transform")
    assert result.exit_code == 0, result.output
    want = np.load(EXPECTED_ORIGINAL)
    assert np.abs(np.load(tmp_path / "p.npy") - want).max() <= FP32_LIMIT * (1 + np.abs(want).max())


def test_in_process_runtime_imports_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from deepspot.runtime import load_runner\n"
        "with np.load(sys.argv[2]) as z: feed = {k: z[k][:4] for k in ('spot', 'subspot', 'neighbors')}\n"
        "with load_runner(sys.argv[1], 'ort-cpu') as r: y = r.infer(feed)['expression']\n"
        "print(y.shape, 'torch' in sys.modules and sys.modules['torch'] is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ONNX), str(SLIDE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(4, 5) False"


def test_ort_cuda_device_code_needs_no_torch():
    """ort-cuda's binding, CUDA graph and pipeline code, and the indexed layout's table written on the device, run on
    the CPU provider with a host stand-in for the CUDA runtime, in an interpreter where ``import torch`` fails."""
    stand_in = Path(__file__).resolve().parents[1] / "runtime" / "graph_replay.py"
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "spec = importlib.util.spec_from_file_location('graph_replay', sys.argv[1])\n"
        "stand_in = importlib.util.module_from_spec(spec); spec.loader.exec_module(stand_in)\n"
        "from deepspot.data import load_bundle\n"
        "from deepspot.runtime.artifacts import read_onnx\n"
        "from deepspot.runtime.ort import OrtRunner\n"
        "from deepspot.runtime.stream import predict\n"
        "from deepspot.runtime.indexed import pipeline_from_folder, predict_indexed\n"
        "from deepspot.runtime.backends import RunnerOptions\n"
        "def device_runner(path, info):\n"
        "    r = OrtRunner(path, 'ort-cpu', info, cuda_graph=True, io_binding=True, batch_size=16)\n"
        "    r._cuda = stand_in.HostCuda(); return r\n"
        "with np.load(sys.argv[3]) as z: feed = {k: z[k] for k in ('spot', 'subspot', 'neighbors')}\n"
        "feed['spot'] = feed['spot'][:, None, :] if feed['spot'].ndim == 2 else feed['spot']\n"
        "with device_runner(sys.argv[2], read_onnx(sys.argv[2])[0]) as r:\n"
        "    dense = [predict(r, feed, 16) for _ in range(2)]\n"
        "slide = dict(load_bundle(sys.argv[5]).arrays)\n"
        "with pipeline_from_folder(sys.argv[4], 'ort-cpu', RunnerOptions(batch_size=16), device_gather=True) as p:\n"
        "    host = p.encoder\n"
        "    p.encoder = device_runner(host.path, host.info).activate()\n"
        "    indexed, where = predict_indexed(p, slide, 16)\n"
        "    p.encoder.deactivate(); p.encoder = host\n"
        "want = np.load(sys.argv[6])\n"
        "print(max(float(np.abs(y - want).max()) for y in dense + [indexed]), where,\n"
        "      sys.modules.get('torch') is not None)\n"
    )
    argv = [stand_in, ONNX, SLIDE, INDEXED, SLIDE_INDEX, EXPECTED]
    out = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    err, where, torch_loaded = out.stdout.split()
    assert float(err) <= FP32_LIMIT and where == "device" and torch_loaded == "False"


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt", "tensorrt"])
def test_gpu_backends_without_their_packages_say_what_to_install(tmp_path, backend):
    from deepspot.runtime.backends import Probe, unavailable_reason

    reason = unavailable_reason(backend, Probe.detect())
    if reason is None:
        pytest.skip(f"{backend} can run here")
    result = no_torch("infer", ONNX, "-i", SLIDE, "-o", tmp_path / "p.npy", "--backend", backend, "--no-progress")
    # what to install, or (onnxruntime-gpu installed but no driver) what to check
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install" in result.stderr or "check the NVIDIA driver" in result.stderr
    assert not (tmp_path / "p.npy").exists()


def test_info_without_torch():
    result = no_torch("info", ONNX, "--json")
    assert result.returncode == 0, result.stderr
    assert '"family": "spot"' in result.stdout and '"expression"' in result.stdout
    # a checkpoint's contents need PyTorch to read: one line that says what to install
    checkpoint = DATA / "absent.safetensors"
    result = no_torch("info", checkpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert "deepspot info needs PyTorch" in result.stderr and "pip install 'deepspot[torch]'" in result.stderr


@pytest.mark.parametrize(
    "model, bundle, expected, extra",
    [
        (ONNX, SLIDE, EXPECTED, []),
        (INDEXED, SLIDE_INDEX, EXPECTED, []),
        (ONNX, SLIDE, EXPECTED_ORIGINAL, ["--inverse-transform"]),
    ],
    ids=["dense", "indexed", "original-scale"],
)
def test_parity_against_stored_outputs_without_torch(tmp_path, model, bundle, expected, extra):
    report = tmp_path / "parity.json"
    result = no_torch("parity", model, "--expected", expected, "-i", bundle, "--report", report, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    import json

    data = json.loads(report.read_text())
    assert data["passed"] and data["n"] == 40 and data["outputs"][0]["max_abs"] <= FP32_LIMIT


def test_parity_against_wrong_outputs_fails_with_exit_1(tmp_path):
    wrong = tmp_path / "wrong.npy"
    values = np.load(EXPECTED)
    values[7, 2] += 0.01
    np.save(wrong, values)
    result = run("parity", ONNX, "--expected", wrong, "-i", SLIDE)
    assert result.exit_code == 1 and "FAIL" in result.output


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: np.save(p, np.zeros((39, 5), np.float32)), "predicts 40 x 5"),
        (lambda p: np.save(p, np.full((40, 5), np.nan, np.float32)), "NaN or infinity"),
        (lambda p: np.save(p, np.zeros(40, np.float32)), "2-D float array"),
        (lambda p: p.write_bytes(b"not an array"), "not a readable"),
    ],
    ids=["shape", "nan", "rank", "corrupt"],
)
def test_parity_bad_expected_outputs_are_one_line_errors(tmp_path, make, needle):
    bad = tmp_path / "bad.npy"
    make(bad)
    result = run("parity", ONNX, "--expected", bad, "-i", SLIDE)
    assert result.exit_code == 2 and needle in result.output, result.output


def test_parity_expected_needs_the_bundle_and_one_model():
    assert run("parity", ONNX, "--expected", EXPECTED).exit_code == 2
    assert run("parity", ONNX, ONNX, "--expected", EXPECTED, "-i", SLIDE).exit_code == 2


def test_bench_compares_onnx_backends_without_torch(tmp_path):
    out = tmp_path / "bench.json"
    result = no_torch("bench", "--model", ONNX, "--backends", "ort-cpu", "--quick", "--repeats", "2", "--warmup",
                      "1", "--json", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(out.read_text())
    assert report["baseline"] == "ort-cpu" and "torch" not in report["machine"]
    (r,) = report["results"]
    assert r["backend"] == "ort-cpu" and r["items_per_s"] > 0 and r["ratio_to_torch"] == pytest.approx(1.0)
    assert report["workload"]["input_size"] == 8 and report["workload"]["output_size"] == 5  # the model's sizes


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "x.npz", "--family", "spot", "--out", "run"],
        ["export", "--family", "spot", "--input-size", "8", "--output-size", "4", "-o", "x.onnx"],
        ["quickstart"],
        ["bench", "--quick"],
        ["parity", "model.safetensors", str(ONNX), "--random", "4"],
        ["infer", "model.safetensors", "-i", str(SLIDE), "-o", "p.npy"],
        ["bench", "--model", str(ONNX), "--backends", "torch"],
    ],
    ids=["train", "export", "quickstart", "bench", "parity-checkpoint", "infer-checkpoint", "bench-torch-on-onnx"],
)
def test_commands_that_need_torch_say_what_to_install(tmp_path, argv):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; from deepspot.cli import main; "
         "sys.argv = sys.argv[1:]; main()", "deepspot", *argv],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "deepspot[torch]" in result.stderr or "runs a checkpoint" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_backend_probe_without_torch():
    from deepspot.runtime.backends import Probe, unavailable_reason

    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    serving_gpu = Probe(providers, cuda=False, tensorrt=True, torch=False)
    assert unavailable_reason("ort-trt", serving_gpu) is None and unavailable_reason("ort-cuda", serving_gpu) is None
    for name in ("torch", "torch-cuda", "tensorrt"):
        assert "deepspot[torch]" in unavailable_reason(name, serving_gpu)
    assert "ort-trt runs TensorRT without it" in unavailable_reason("tensorrt", serving_gpu)


def test_doctor_runs_without_torch_and_says_why_the_torch_backends_cannot():
    result = no_torch("doctor", "--json")
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["backends"]["ort-cpu"]["available"]  # (its version list reads package metadata, not imports)
    assert "deepspot[torch]" in report["backends"]["torch"]["why not"]


def test_cohort_without_torch(tmp_path):
    import shutil

    for name in ("a", "b"):
        shutil.copy(SLIDE, tmp_path / f"{name}.npz")
    result = no_torch("infer", ONNX, "--input", tmp_path / "a.npz", tmp_path / "b.npz", "--output-dir",
                      tmp_path / "out", "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("a", "b"):
        got = read_predictions(tmp_path / "out" / f"{name}.h5ad")
        assert np.abs(got - np.load(EXPECTED)).max() <= FP32_LIMIT
