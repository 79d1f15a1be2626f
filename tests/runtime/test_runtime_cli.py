"""``deepspot infer | parity | bench | engine | quickstart`` as a user runs them; mistakes exit 2 with one line."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deepspot import checkpoint
from deepspot.data import save_bundle
from deepspot.cli import app

from _cli import error_line

cli = CliRunner()


def run(*args: str):
    return cli.invoke(app, [str(a) for a in args])


def test_infer_writes_predictions(artifacts, eager, tmp_path):
    a = artifacts()
    result = run(
        "infer", a.onnx, "--input", a.bundle, "--output", tmp_path / "p.npz", "--batch-size", 10, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "37 x 5 predictions on ort-cpu" in result.output and "items/s" in result.output
    with np.load(tmp_path / "p.npz") as z:
        np.testing.assert_allclose(z["predictions"], eager(a.model, a.inputs()), atol=1e-5)
    result = run("infer", a.checkpoint, "-i", a.bundle, "-o", tmp_path / "p.npy", "--inverse-transform")
    assert result.exit_code == 0 and "on torch" in result.output


def test_infer_mistakes_exit_2_with_one_line(artifacts, tmp_path):
    a = artifacts()
    error_line(run("infer", a.onnx, "-i", tmp_path / "nope.npz", "-o", tmp_path / "p.npy"), "no such bundle")
    error_line(run("infer", a.onnx, "-i", a.bundle, "-o", tmp_path / "p.csv"), "unknown output type")
    error_line(
        run("infer", a.onnx, "-i", a.bundle, "-o", tmp_path / "p.npy", "--backend", "gpu"), "unknown backend"
    )
    error_line(run("infer", tmp_path / "missing.onnx", "-i", a.bundle, "-o", tmp_path / "p.npy"), "missing.onnx")
    error_line(
        run("infer", a.onnx, "-i", artifacts("cell", "neighbors").bundle, "-o", tmp_path / "p.npy"), "spot model"
    )
    if importlib.util.find_spec("tensorrt") is None:
        error_line(
            run("infer", a.onnx, "-i", a.bundle, "-o", tmp_path / "p.npy", "--backend", "tensorrt"),
            "pip install 'deepspot[tensorrt]'",
        )
    error_line(run("infer", a.onnx, "-i", a.bundle, "-o", tmp_path / "p.npy", "--tf32"),
               "tf32 is a math mode of NVIDIA GPUs; the ort-cpu backend runs on the CPU")  # fmt: skip
    error_line(run("parity", a.checkpoint, a.onnx, "--random", 8, "--tf32"), "tf32 is a math mode")
    error_line(run("infer", a.onnx, "-i", a.bundle, "-o", tmp_path / "p.npy", "--cuda-graph"),
               "CUDA graphs are replayed by the onnxruntime GPU backends")  # fmt: skip
    assert not (tmp_path / "p.npy").exists()


def test_infer_refuses_a_gpu_index_on_a_cpu_backend_and_runs_what_torch_takes(artifacts, tmp_path):
    a = artifacts()
    out = tmp_path / "p.npy"
    error_line(run("infer", a.onnx, "-i", a.bundle, "-o", out, "--device", "1"),
               "--device 1 names a GPU, but backend 'ort-cpu' runs on the CPU")  # fmt: skip
    error_line(run("infer", a.checkpoint, "-i", a.bundle, "-o", out, "--device", "1"),
               "backend 'torch' runs on the CPU")  # fmt: skip
    assert not out.exists()
    # what the torch backends take still runs
    result = run("infer", a.checkpoint, "-i", a.bundle, "-o", out, "--torch-graph", "export", "--no-progress")
    assert result.exit_code == 0 and out.exists(), result.output


def test_an_unknown_table_option_is_refused_on_a_dense_run_too(artifacts, tmp_path):
    # the table options only matter in the indexed layout, but a typo must not pass because the run is dense
    a = artifacts()
    out = tmp_path / "p.npy"
    error_line(run("infer", a.onnx, "-i", a.bundle, "-o", out, "--table", "bogus"),
               "unknown table location 'bogus'; expected one of: auto, memory, mmap, device")  # fmt: skip
    error_line(run("infer", a.onnx, "-i", a.bundle, "-o", out, "--table-dtype", "fp8"),
               "unknown table dtype 'fp8'; expected one of: fp32, fp16")  # fmt: skip
    error_line(run("infer", a.onnx, "-i", a.bundle, a.bundle, "--output-dir", tmp_path / "c", "--table", "x"),
               "unknown table location 'x'")  # fmt: skip
    assert not out.exists() and not (tmp_path / "c").exists()


def test_unavailable_gpu_backend_exits_2_or_falls_back_with_a_warning(artifacts, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    a = artifacts()
    error_line(
        run("infer", a.onnx, "-i", a.bundle, "-o", tmp_path / "p.npy", "--backend", "ort-cuda"),
        "pip install 'deepspot[gpu]'",
        "--allow-fallback",
    )
    result = run(
        "infer",
        a.onnx,
        "-i",
        a.bundle,
        "-o",
        tmp_path / "p.npy",
        "--backend",
        "ort-cuda",
        "--allow-fallback",
        "--no-progress",
    )
    assert result.exit_code == 0
    assert "Warning: falling back from 'ort-cuda' to 'ort-cpu'" in result.output and "on ort-cpu" in result.output
    # the default batch is the backend's that ran: the CPU's, not the GPU's it was chosen for
    import warnings

    from deepspot.runtime.infer import CPU_BATCH, GPU_BATCH, infer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fell_back = infer(a.onnx, a.bundle, tmp_path / "q.npy", backend="ort-cuda", allow_fallback=True)
        asked = infer(a.onnx, a.bundle, tmp_path / "r.npy", backend="ort-cuda", batch_size=7, allow_fallback=True)
    assert (fell_back.backend, fell_back.batch_size, asked.batch_size) == ("ort-cpu", CPU_BATCH, 7)
    assert GPU_BATCH["spot"] != CPU_BATCH


def test_parity_passes_prints_a_table_and_writes_a_report(artifacts, tmp_path):
    a = artifacts()
    result = run("parity", a.checkpoint, a.onnx, "--input", a.bundle, "--report", tmp_path / "parity.json")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "max abs err" in result.output
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["backend"] == "ort-cpu" and report["n"] == 37


def test_parity_failure_exits_1(artifacts, make_model, tmp_path):
    a = artifacts()
    other = checkpoint.save(make_model("spot", "subspot_neighbors", seed=3), tmp_path / "other.safetensors")
    result = run("parity", other, a.onnx, "--random", 16, "--report", tmp_path / "parity.json")
    assert result.exit_code == 1 and "FAIL" in result.output
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is False
    assert run("parity", a.checkpoint, a.onnx, "--atol", 0, "--rtol", 0).exit_code == 1
    error_line(
        run("parity", a.checkpoint, a.onnx, "--input", a.bundle, "--random", 5), "either --input or --random"
    )
    error_line(run("parity", artifacts("cell", "neighbors").checkpoint, a.onnx), "cell/neighbors")


def test_bench_quick_with_json(tmp_path):
    result = run(
        "bench",
        "--workload",
        "visium-uni",
        "--backends",
        "torch,ort-cpu",
        "--quick",
        "--repeats",
        2,
        "--warmup",
        1,
        "--json",
        tmp_path / "bench.json",
    )
    assert result.exit_code == 0, result.output
    assert "x torch" in result.output and "GEMM fp32" in result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["backend"] for r in report["results"]] == ["torch", "ort-cpu"]
    assert all(r["ratio_to_torch"] > 0 for r in report["results"])
    error_line(run("bench", "--workload", "xenium-slide", "--items", 1), "needs at least 2 items")
    error_line(run("bench", "--backends", "torch,nope", "--quick"), "unknown backend 'nope'")


def test_engine_build_without_tensorrt_exits_2_with_the_install_hint(artifacts, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    result = run("engine", "build", artifacts().onnx, "-o", tmp_path / "m.plan", "--fp16", "--max-batch", 512)
    error_line(result, "pip install 'deepspot[tensorrt]'")
    assert not (tmp_path / "m.plan").exists()


def test_engine_info_reads_the_header_without_tensorrt(tmp_path):
    from deepspot.runtime.trt import write_plan

    write_plan(
        tmp_path / "m.plan",
        b"x",
        {
            "gpu": "NVIDIA H200",
            "tensorrt_version": "10.3",
            "profile": {key: {"spot": [1, 1, 4], "neighbors": [1, 6, 4]} for key in ("min", "opt", "max")},
            "model": {"family": "spot", "mode": "neighbors", "genes": ["a"], "config": {"input_size": 4, "output_size": 1}},
        },
    )
    result = run("engine", "info", tmp_path / "m.plan")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["gpu"] == "NVIDIA H200" and info["model"] == {"family": "spot", "mode": "neighbors"}
    error_line(run("engine", "info", tmp_path / "none.plan"), "no such engine file")


@pytest.mark.slow
def test_quickstart_runs_the_whole_path(tmp_path):
    result = run("quickstart", "--workdir", tmp_path / "qs")
    assert result.exit_code == 0, result.output
    for step in ("synth", "train", "export", "infer", "parity", "bench"):
        assert step in result.output
    assert "FAILED" not in result.output
    names = {p.name for p in (tmp_path / "qs").iterdir()}
    assert {
        "train.npz",
        "test.npz",
        "model.safetensors",
        "model.onnx",
        "predictions.npz",
        "parity.json",
        "bench.json",
    } <= names
    assert json.loads((tmp_path / "qs" / "parity.json").read_text())["passed"]


@pytest.mark.parametrize("command", ["parity", "bench"])
def test_report_into_a_missing_folder_fails_before_the_work(artifacts, tmp_path, monkeypatch, command):
    import deepspot.runtime
    import deepspot.runtime.bench

    def no_work(*args, **kwargs):
        raise AssertionError("the comparison ran before the output path was checked")

    monkeypatch.setattr(deepspot.runtime, "check_parity", no_work)
    monkeypatch.setattr(deepspot.runtime.bench, "run_bench", no_work)
    a = artifacts()
    target = tmp_path / "missing" / "r.json"
    if command == "parity":
        result = run("parity", a.checkpoint, a.onnx, "--report", target)
    else:
        result = run("bench", "--quick", "--json", target)
    error_line(result, "missing", "does not exist")
    error_line(run(command, *(["--quick"] if command == "bench" else [a.checkpoint, a.onnx]),
                       "--json" if command == "bench" else "--report", tmp_path), "is a directory")  # fmt: skip


def test_a_bundle_array_the_model_does_not_take_is_named_in_a_warning(artifacts, make_model, tmp_path):
    from deepspot.export import export_onnx

    a = artifacts()  # spot/subspot_neighbors: the bundle holds 'subspot'
    model = make_model("spot", "neighbors")
    onnx = export_onnx(model, tmp_path / "neighbors.onnx").path
    result = run("infer", onnx, "-i", a.bundle, "-o", tmp_path / "p.npy", "--no-progress")
    assert result.exit_code == 0, result.output
    warnings_ = [line for line in result.output.splitlines() if line.startswith("Warning: ")]
    assert len(warnings_) == 1 and "'subspot'" in warnings_[0] and "does not take" in warnings_[0], result.output
    assert "warnings.warn" not in result.output


@pytest.mark.parametrize("seed", [-3, 2**32])
def test_quickstart_refuses_a_seed_out_of_range_before_any_work(tmp_path, seed):
    result = run("quickstart", "--workdir", tmp_path / "qs", "--seed", seed)
    error_line(result, f"--seed must lie in 0..4294967295, got {seed}")
    assert not (tmp_path / "qs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--random", -5], "--random must be at least 1, got -5"),
        (["--random", 0], "--random must be at least 1, got 0"),
        (["--random", 10**9], "not enough memory for --random 1000000000 items"),
        (["--batch-size", 0], "--batch-size must be at least 1, got 0"),
        (["--atol", -1], "--atol must be a finite number of at least 0, got -1.0"),
        (["--atol", "nan"], "--atol must be a finite number of at least 0, got nan"),
        (["--rtol", "inf"], "--rtol must be a finite number of at least 0, got inf"),
        (["--seed", -1], "--seed must be at least 0, got -1"),
    ],
)
def test_parity_refuses_options_it_cannot_use_before_any_work(artifacts, tmp_path, args, message):
    a = artifacts()
    report = tmp_path / "parity.json"
    error_line(run("parity", a.checkpoint, a.onnx, *args, "--report", report), message)
    assert not report.exists()


def test_parity_on_a_bundle_without_items_exits_2(artifacts, tmp_path):
    a = artifacts()
    empty = {k: v if k == "genes" else v[:0] for k, v in a.arrays.items()}
    bundle = save_bundle(tmp_path / "empty.npz", empty)
    error_line(run("parity", a.checkpoint, a.onnx, "-i", bundle), "empty.npz: has no items")
    np.save(tmp_path / "expected.npy", np.zeros((0, a.arrays["target"].shape[1]), np.float32))
    error_line(run("parity", a.onnx, "--expected", tmp_path / "expected.npy", "-i", bundle),
               "expected.npy: has no items")  # fmt: skip


def _too_many_threads() -> int:
    from deepspot.checks import available_cpus

    return available_cpus() + 1  # harmless if it were taken: the test must not start thousands of threads


def test_infer_refuses_counts_below_1_and_more_threads_than_cpus(artifacts, tmp_path):
    from deepspot.checks import available_cpus

    a = artifacts()
    out = tmp_path / "p.npy"
    cpus = available_cpus()
    for args, message in [
        (["--batch-size", 0], "--batch-size must be at least 1, got 0"),
        (["--max-bag", 0], "--max-bag must be at least 1, got 0"),
        (["--max-bag", -3], "--max-bag must be at least 1, got -3"),
        (["--threads", _too_many_threads()], f"--threads must lie in 1..{cpus} (the CPUs this process may use)"),
        (["--threads", 0], f"--threads must lie in 1..{cpus}"),
        (["--threads", -1], f"--threads must lie in 1..{cpus}"),
    ]:
        error_line(run("infer", a.onnx, "-i", a.bundle, "-o", out, *args), message)
        assert not out.exists()
    # A cohort refuses them before any slide runs, not once per slide.
    cohort = tmp_path / "cohort"
    for args in (["--threads", _too_many_threads()], ["--batch-size", 0], ["--max-bag", 0]):
        error_line(run("infer", a.onnx, "-i", a.bundle, a.bundle, "--output-dir", cohort, *args), args[0])
    assert not cohort.exists()


def test_bench_refuses_counts_below_1_and_more_threads_than_cpus(tmp_path):
    report = tmp_path / "bench.json"
    for args, message in [
        (["--quick", "--batch-size", -1], "--batch-size must be at least 1, got -1"),
        (["--quick", "--batch-size", 0], "--batch-size must be at least 1, got 0"),
        (["--quick", "--repeats", 0], "--repeats must be at least 1, got 0"),
        (["--quick", "--warmup", -1], "--warmup must be at least 0, got -1"),
        (["--quick", "--threads", _too_many_threads()], "--threads must lie in 1.."),
        (["--quick", "--threads", 0], "--threads must lie in 1.."),
        (["--workload", "xenium-slide", "--quick", "--items", 0], "needs at least 2 items, got 0"),
    ]:
        error_line(run("bench", *args, "--json", report), message)
        assert not report.exists()


def test_runner_options_and_bag_limits_are_checked_for_python_callers_too():
    from deepspot.data import check_bag_size
    from deepspot.errors import ConfigError
    from deepspot.runtime.backends import RunnerOptions
    from deepspot.runtime.ort import session_options

    for bad in (10_000, 0, -1):
        with pytest.raises(ConfigError, match=f"^threads must lie in 1..[0-9]+ .*, got {bad}"):
            RunnerOptions(threads=bad)
    with pytest.raises(ConfigError, match="^threads must lie in"):
        session_options(threads=10_000)
    with pytest.raises(ConfigError, match="^batch_size must be at least 1, got 0"):
        RunnerOptions(batch_size=0)
    assert RunnerOptions(threads=1).threads == 1 and RunnerOptions().threads is None
    with pytest.raises(ConfigError, match="^max_bag must be at least 1, got 0"):
        check_bag_size("neighbors", 1, "bundle", max_bag=0)


def test_the_folder_train_writes_given_for_a_model_names_the_checkpoint_in_it(artifacts, tmp_path):
    import shutil

    a = artifacts()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(a.checkpoint, run_dir / "model.safetensors")
    hint = f"run: not a model file; it is the folder `deepspot train` writes: pass {run_dir / 'model.safetensors'}"
    error_line(run("infer", run_dir, "-i", a.bundle, "-o", tmp_path / "p.npy"), hint)
    error_line(run("bench", "--model", run_dir, "--quick"), hint)
    parity = run("parity", run_dir, a.onnx, "--random", 4)
    error_line(parity, f"run: no such checkpoint file; it is the folder `deepspot train` writes: pass {run_dir}/")
    empty = tmp_path / "empty"
    empty.mkdir()
    error_line(run("infer", empty, "-i", a.bundle, "-o", tmp_path / "p.npy"), "empty: a folder, not a model file")
    (empty / "encoder.onnx").write_bytes(b"")  # an indexed export's folder that lost its head graph
    error_line(run("infer", empty, "-i", a.bundle, "-o", tmp_path / "p.npy"),
               "empty: an indexed export's folder without head.onnx")  # fmt: skip
    assert not (tmp_path / "p.npy").exists()


def test_infer_refuses_unknown_option_values_whichever_layout_runs(artifacts, tmp_path):
    """A misspelt --table or --table-dtype was passed over when the bundle took the dense layout, a GPU index below 0
    on the CPU backends, and an unknown --precision was answered with advice to export at that precision."""
    a = artifacts()
    out = tmp_path / "p.npy"
    for args, message in [
        (["--table", "memroy"], "unknown table location 'memroy'; expected one of: auto, memory, mmap, device"),
        (["--table-dtype", "int8"], "unknown table dtype 'int8'; expected one of: fp32, fp16"),
        (["--device", -1], "--device must be at least 0, got -1"),
        (["--precision", "FP32"], "unknown precision 'FP32' (--precision); expected one of: fp32, fp16, bf16"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
    ]:
        error_line(run("infer", a.onnx, "-i", a.bundle, "-o", out, *args), message)
        assert not out.exists()
    error_line(run("infer", a.checkpoint, "-i", a.bundle, "-o", out, "--precision", "half"), "unknown precision")
    error_line(run("parity", a.checkpoint, a.onnx, "--random", 4, "--device", -2), "--device must be at least 0")
    assert not out.exists()


@pytest.mark.parametrize("model, args, message", [
    ("onnx", ["--compile"], "--compile applies to the torch backends (torch, torch-cuda), not ort-cpu"),
    ("onnx", ["--torch-graph", "export"], "--torch-graph applies to the torch backends (torch, torch-cuda), not ort-cpu"),
    ("onnx", ["--cache-dir", "."], "--cache-dir holds TensorRT engines: it applies to ort-trt and tensorrt, not ort-cpu"),
    ("checkpoint", ["--cache-dir", "."], "not torch"),
    ("onnx", ["--table-dtype", "fp16"], "--table-dtype applies to the indexed layout run from a checkpoint"),
    ("checkpoint", ["--torch-graph", "fused"], "unknown --torch-graph 'fused'; expected one of: eager, export"),
])  # fmt: skip
def test_infer_refuses_options_the_backend_would_pass_over(artifacts, tmp_path, model, args, message):
    a = artifacts()
    out = tmp_path / "p.npy"
    error_line(run("infer", getattr(a, model), "-i", a.bundle, "-o", out, *args), message)
    assert not out.exists()


def test_parity_refuses_a_torch_graph_for_an_onnx_backend(artifacts):
    a = artifacts()
    error_line(run("parity", a.checkpoint, a.onnx, "--random", 4, "--torch-graph", "export"),
               "--torch-graph applies to the torch backends")  # fmt: skip
    assert run("parity", a.checkpoint, a.checkpoint, "--random", 4, "--torch-graph", "export").exit_code == 0


def test_parity_refuses_a_gpu_index_on_a_cpu_backend(artifacts, tmp_path):
    # infer refused it, parity ran on the CPU and reported a pass for a GPU it never used
    a = artifacts()
    error_line(run("parity", a.checkpoint, a.onnx, "--random", 4, "--device", 1),
               "--device 1 names a GPU, but backend 'ort-cpu' runs on the CPU")  # fmt: skip
    expected = tmp_path / "pred.npy"
    np.save(expected, np.zeros((3, 3), np.float32))
    error_line(run("parity", a.onnx, "--expected", expected, "-i", a.bundle, "--device", 1),
               "--device 1 names a GPU, but backend 'ort-cpu' runs on the CPU")  # fmt: skip
