"""Backend registry, selection and the fallback rule, provider options and cache folders: all on the CPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from deepspot.errors import BackendUnavailableError, CheckpointError, ConfigError
from deepspot.runtime import BACKENDS, FallbackWarning, Probe, RunnerOptions, load_runner, select_backend
from deepspot.runtime.backends import ort_trt_cache_dir, unavailable_reason
from deepspot.runtime.ort import (
    CPU,
    CUDA,
    TRT,
    cuda_provider_options,
    physical_cores,
    session_from_onnx,
    trt_provider_options,
)
from deepspot.runtime.profiles import derive_profile

CPU_ONLY = Probe(providers=(CPU,), cuda=False, tensorrt=False)
FULL_GPU = Probe(providers=(TRT, CUDA, CPU), cuda=True, tensorrt=True)


def test_every_backend_has_an_install_hint_and_a_fallback_chain_that_ends_on_the_cpu():
    for name, backend in BACKENDS.items():
        assert backend.install and backend.needs
        chain, current = [name], backend.fallback
        while current is not None:
            chain.append(current)
            current = BACKENDS[current].fallback
        assert BACKENDS[chain[-1]].device == "cpu", chain


@pytest.mark.parametrize(
    ("backend", "hint"),
    [
        ("ort-cuda", "pip install 'deepspot[gpu]'"),
        ("ort-trt", "deepspot[gpu,tensorrt]"),
        ("tensorrt", "pip install 'deepspot[tensorrt]'"),
        ("torch-cuda", "CUDA build of PyTorch"),
    ],
)
def test_missing_backend_is_an_error_that_says_what_to_install(backend, hint):
    with pytest.raises(BackendUnavailableError) as e:
        select_backend(backend, probe=CPU_ONLY)
    assert hint in str(e.value) and "(allow_fallback=True permits another backend)" in str(e.value)


def test_the_fallback_hint_is_given_only_where_allow_fallback_would_help():
    # torch has no fallback, a plan runs on tensorrt only, and a cohort refuses --allow-fallback
    no_torch = Probe(providers=(CPU,), cuda=False, tensorrt=False, torch=False)
    for backend, probe, kind, hint in [
        ("torch", no_torch, "model", {}),
        ("tensorrt", CPU_ONLY, "plan", {}),
        ("ort-cuda", CPU_ONLY, "onnx", {"fallback_hint": False}),
    ]:
        with pytest.raises(BackendUnavailableError) as e:
            select_backend(backend, probe=probe, kind=kind, **hint)
        assert "allow_fallback" not in str(e.value), (backend, str(e.value))
    with pytest.raises(BackendUnavailableError, match="allow_fallback=True permits another backend"):
        select_backend("tensorrt", probe=CPU_ONLY, kind="onnx")


def test_no_silent_fallback_but_an_announced_one_when_allowed(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be swallowed quietly: the strict path raises, it does not warn
        with pytest.raises(BackendUnavailableError):
            select_backend("ort-cuda", probe=CPU_ONLY)
    with (
        caplog.at_level("INFO", logger="deepspot.runtime"),
        pytest.warns(FallbackWarning, match="'ort-cuda' to 'ort-cpu'"),
    ):
        selection = select_backend("ort-cuda", allow_fallback=True, probe=CPU_ONLY)
    assert selection.backend == "ort-cpu" and selection.fell_back and "CUDAExecutionProvider" in selection.reasons[0]
    assert "falling back" in caplog.text
    with pytest.warns(FallbackWarning):
        assert select_backend("tensorrt", allow_fallback=True, probe=CPU_ONLY).backend == "ort-cpu"
    with pytest.warns(FallbackWarning):
        assert select_backend("torch-cuda", allow_fallback=True, probe=CPU_ONLY).backend == "torch"


def test_a_fallback_leaves_out_the_gpu_options_it_cannot_take(artifacts, tmp_path):
    # `--backend ort-cuda --tf32 --cuda-graph --allow-fallback` is how a script says "on the GPU where there is one":
    # on a machine without one it runs on the CPU and says what it left out, instead of refusing the GPU options.
    a = artifacts()
    options = RunnerOptions(tf32=True, cuda_graph=True)
    with pytest.warns(FallbackWarning) as record:
        runner = load_runner(a.onnx, "ort-cuda", options, allow_fallback=True, probe=CPU_ONLY)
    assert runner.backend == "ort-cpu" and options.tf32 and options.cuda_graph  # the caller's options are untouched
    assert "tf32 and cuda_graph do not apply on ort-cpu; running without" in [str(w.message) for w in record]
    assert runner.info.precision == "fp32"
    with pytest.warns(FallbackWarning) as record:
        assert load_runner(a.checkpoint, "torch-cuda", RunnerOptions(tf32=True), True, CPU_ONLY).backend == "torch"
    assert "tf32 does not apply on torch; running without" in [str(w.message) for w in record]
    with pytest.raises(ConfigError, match="tf32 is a math mode of NVIDIA GPUs"):  # asked of a CPU backend: refused
        load_runner(a.onnx, "ort-cpu", RunnerOptions(tf32=True), allow_fallback=True, probe=CPU_ONLY)


def test_available_backend_is_chosen_as_asked():
    for name in BACKENDS:
        assert select_backend(name, probe=FULL_GPU) == select_backend(name, allow_fallback=True, probe=FULL_GPU)
        assert select_backend(name, probe=FULL_GPU).backend == name
    assert unavailable_reason("ort-cpu", CPU_ONLY) is None
    assert "tensorrt package" in unavailable_reason("tensorrt", Probe((TRT, CUDA, CPU), True, False))


def test_a_cuda_build_of_pytorch_without_a_gpu_is_not_told_to_install_one():
    # torch 2.11+cu130 on a machine with no driver: reinstalling PyTorch would not help
    cuda_build = Probe(providers=(CPU,), cuda=False, tensorrt=False, torch_cuda_build="13.0")
    reason = unavailable_reason("torch-cuda", cuda_build)
    assert "PyTorch is a CUDA 13.0 build but sees no GPU" in reason and "nvidia-smi" in reason
    assert "install a CUDA build" not in reason
    assert "install a CUDA build of PyTorch" in unavailable_reason("torch-cuda", CPU_ONLY)


def test_a_provider_missing_the_driver_library_says_it_is_the_driver(tmp_path, monkeypatch):
    from deepspot.runtime import cuda_libs

    library = tmp_path / "libonnxruntime_providers_cuda.so"

    def cdll(name, mode=0):
        raise OSError(f"{library}: libcuda.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(cuda_libs, "provider_library", lambda provider: library)
    monkeypatch.setattr(cuda_libs.ctypes, "CDLL", cdll)
    error = cuda_libs.provider_load_error("CUDAExecutionProvider")
    assert error.startswith("libonnxruntime_providers_cuda.so: libcuda.so.1: cannot open shared object file")
    assert "comes with the NVIDIA driver" in error


NO_DRIVER = "libcuda.so.1: cannot open shared object file (libcuda.so.1 comes with the NVIDIA driver)"


def test_a_listed_provider_that_cannot_run_is_unavailable_and_can_be_fallen_back_from():
    # onnxruntime-gpu lists CUDA and TensorRT whether or not they can run (onnxruntime issue #23372)
    no_driver = Probe(providers=(TRT, CUDA, CPU), provider_problems={CUDA: "CUDA: no driver", TRT: "TensorRT: no"})
    assert unavailable_reason("ort-cuda", no_driver).endswith("GPU: CUDA: no driver")
    with pytest.warns(FallbackWarning, match="'ort-cuda' to 'ort-cpu'"):
        assert select_backend("ort-cuda", allow_fallback=True, probe=no_driver).backend == "ort-cpu"
    with pytest.raises(BackendUnavailableError, match="CUDA: no driver"):
        select_backend("ort-cuda", probe=no_driver)
    no_tensorrt = Probe(providers=(TRT, CUDA, CPU), provider_problems={TRT: "TensorRT: no"})
    with pytest.warns(FallbackWarning, match="'ort-trt' to 'ort-cuda'"):
        assert select_backend("ort-trt", allow_fallback=True, probe=no_tensorrt).backend == "ort-cuda"


@pytest.mark.parametrize(
    "library, device, expected",
    [
        (NO_DRIVER, None, f"CUDAExecutionProvider is listed but does not load ({NO_DRIVER}); check the NVIDIA driver"),
        ("libcudnn.so.9: cannot open shared object file", None, "pip install 'onnxruntime-gpu[cuda,cudnn]'"),
        (None, "cudaSetDevice failed: no CUDA-capable device is detected (error 100)",
         "CUDAExecutionProvider finds no usable GPU (cudaSetDevice failed: no CUDA-capable device is detected "
         "(error 100)); check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"),
        (None, None, None),
    ],
)  # fmt: skip
def test_the_probe_tries_the_gpu_providers_only_when_asked(monkeypatch, library, device, expected):
    from deepspot.runtime import backends, cuda_libs

    class Listed:
        @staticmethod
        def get_available_providers():
            return [CUDA, CPU]

    tried: list[str] = []
    monkeypatch.setattr(backends, "import_ort", lambda: Listed)
    monkeypatch.setattr(cuda_libs, "preload_cuda_libraries", lambda: tried.append("preload") or {})
    monkeypatch.setattr(cuda_libs, "installed_provider_error", lambda p: tried.append(p) or library)
    monkeypatch.setattr(cuda_libs, "cuda_device_error", lambda device_id: tried.append(device_id) or device)
    assert Probe.detect(torch_cuda=False, load_providers=False).provider_problems == {} and tried == []
    problems = Probe.detect(torch_cuda=False).provider_problems
    assert tried == (["preload", CUDA] if library else ["preload", CUDA, 0])
    if expected is None:
        assert problems == {}
    else:
        assert expected in problems[CUDA] and "deepspot[gpu]" not in problems[CUDA]


def test_a_plan_cannot_fall_back():
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        select_backend("tensorrt", allow_fallback=True, probe=CPU_ONLY, kind="plan")


def test_on_this_machine_ort_cuda_fails_cleanly_or_falls_back_when_allowed(artifacts):
    a = artifacts()
    if CUDA in Probe.detect().providers:
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match=r"deepspot\[gpu\]"):
        load_runner(a.onnx, "ort-cuda")
    with pytest.warns(FallbackWarning):
        runner = load_runner(a.onnx, "ort-cuda", allow_fallback=True)
    assert runner.backend == "ort-cpu" and runner.selection.requested == "ort-cuda"
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        session_from_onnx(a.onnx, [CUDA])


@pytest.mark.parametrize(
    "model, backend, options",
    [("onnx", "ort-cuda", {"tf32": True}), ("onnx", "ort-cuda", {"cuda_graph": True}),
     ("onnx", "ort-trt", {"tf32": True, "cuda_graph": True}), ("checkpoint", "torch-cuda", {"tf32": True})],
)  # fmt: skip
def test_gpu_options_of_the_backend_asked_for_do_not_refuse_an_allowed_fallback(artifacts, model, backend, options):
    """``--backend ort-cuda --tf32 --allow-fallback`` ended in "tf32 is a math mode of NVIDIA GPUs; the ort-cpu backend
    runs on the CPU" where the GPU was missing: the options were checked against the backend fallen back to, while
    --device and --cache-dir count for the one asked for. The CPU backend runs without them; asked of it, they are
    refused."""
    a = artifacts()
    with pytest.warns(FallbackWarning):
        runner = load_runner(getattr(a, model), backend, RunnerOptions(**options), allow_fallback=True, probe=CPU_ONLY)
    assert runner.backend == ("torch" if model == "checkpoint" else "ort-cpu")
    cpu = "torch" if model == "checkpoint" else "ort-cpu"
    with pytest.raises(ConfigError, match="tf32 is a math mode|CUDA graphs are replayed"):
        load_runner(getattr(a, model), cpu, RunnerOptions(**options), allow_fallback=True, probe=CPU_ONLY)


def test_load_runner_matches_backend_to_file_type(artifacts, tmp_path):
    a = artifacts()
    assert load_runner(a.onnx).backend == "ort-cpu"
    assert load_runner(a.checkpoint).backend == "torch"
    assert load_runner(a.model).backend == "torch"
    with pytest.raises(ConfigError, match="runs a checkpoint"):
        load_runner(a.onnx, "torch")
    with pytest.raises(ConfigError, match="runs an ONNX file"):
        load_runner(a.checkpoint, "ort-cpu")
    with pytest.raises(ConfigError) as err:  # named by its type: its repr is the whole module tree
        load_runner(a.model, "ort-cpu")
    assert str(err.value).endswith("an in-memory DeepSpot is a model (deepspot.export.export_onnx writes its graph)")
    with pytest.raises(TypeError, match="a model file or a DeepSpot/DeepCell model, not a dict"):
        load_runner({"spot": None})
    with pytest.raises(ConfigError, match="unknown backend 'onnx'"):
        load_runner(a.onnx, "onnx")
    with pytest.raises(CheckpointError, match="model.txt: no such model file or folder"):
        load_runner(tmp_path / "model.txt")
    (tmp_path / "model.txt").write_text("weights?")
    with pytest.raises(CheckpointError, match="unknown model file type .txt"):
        load_runner(tmp_path / "model.txt")
    with pytest.raises(ConfigError, match="exported at fp32"):
        load_runner(a.onnx, "ort-cpu", RunnerOptions(precision="fp16"))
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_runner(tmp_path / "broken.onnx")


def test_provider_options():
    # onnxruntime's CUDA provider runs fp32 products at TF32 unless use_tf32 says otherwise: it is always said.
    assert cuda_provider_options(1, cuda_graph=True) == {"device_id": "1", "enable_cuda_graph": "1", "use_tf32": "0"}
    assert cuda_provider_options(tf32=True)["use_tf32"] == "1"
    profile = derive_profile(load_specs(), 64, {"subspot": 9, "neighbors": 6})
    options = trt_provider_options("/cache", profile, fp16=True, device_id=2)
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == "/cache"
    assert options["trt_timing_cache_enable"] == "True" and options["trt_timing_cache_path"] == "/cache"
    assert options["trt_fp16_enable"] == "True" and options["device_id"] == "2"
    assert options["trt_profile_min_shapes"] == "spot:1x1x16,subspot:1x9x16,neighbors:1x6x16"
    assert options["trt_profile_max_shapes"] == "spot:64x1x16,subspot:64x9x16,neighbors:64x6x16"
    assert trt_provider_options("/c")[
        "trt_fp16_enable"
    ] == "False" and "trt_profile_min_shapes" not in trt_provider_options("/c")


def load_specs():
    from deepspot.runtime.base import TensorSpec

    return {
        "spot": TensorSpec("spot", ("batch", 1, 16)),
        "subspot": TensorSpec("subspot", ("batch", "n_subspot", 16)),
        "neighbors": TensorSpec("neighbors", ("batch", "n_neighbors", 16)),
    }


def test_ort_trt_cache_folder_depends_on_graph_profile_and_precision(artifacts, tmp_path):
    a, b = artifacts(), artifacts("cell", "neighbors")
    specs = load_specs()
    options = RunnerOptions(batch_size=64, bag_sizes={"subspot": 9, "neighbors": 6}, cache_dir=tmp_path)
    first = ort_trt_cache_dir(a.onnx, specs, "fp32", options)
    assert first.is_dir() and first.parent == tmp_path / "ort-trt" and first.name.startswith("model-")
    assert ort_trt_cache_dir(a.onnx, specs, "fp32", options) == first  # stable
    assert ort_trt_cache_dir(a.onnx, specs, "fp16", options) != first
    assert ort_trt_cache_dir(b.onnx, specs, "fp32", options) != first
    other = RunnerOptions(batch_size=128, bag_sizes=options.bag_sizes, cache_dir=tmp_path)
    assert ort_trt_cache_dir(a.onnx, specs, "fp32", other) != first


def test_physical_cores_and_session_threads(artifacts):
    assert 1 <= physical_cores() <= (__import__("os").cpu_count() or 1)
    session = session_from_onnx(artifacts().onnx, [CPU], threads=1)
    assert session.get_providers() == [CPU]
    # Workers spin between a run's many small nodes, and stop when the run returns (nothing spins between runs).
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.parametrize("fixed_buffers", [False, True], ids=["per-batch", "fixed-buffers"])
def test_io_binding_path_on_the_cpu(artifacts, eager, fixed_buffers):
    """The GPU binding code (staging, fixed buffers with padding, device-resident outputs) on host memory."""
    from deepspot.errors import InputError
    from deepspot.runtime.artifacts import read_onnx
    from deepspot.runtime.ort import OrtRunner

    a = artifacts()
    runner = OrtRunner(a.onnx, "ort-cpu", read_onnx(a.onnx)[0], cuda_graph=fixed_buffers, io_binding=True)
    inputs = a.inputs()
    with runner:
        outs = [runner.infer({k: v[s : s + 8] for k, v in inputs.items()}) for s in range(0, 37, 8)]
        y = np.concatenate([o["expression"] for o in outs])  # outputs are owned copies, not views of a buffer
        np.testing.assert_allclose(y, eager(a.model, inputs), atol=1e-5)
        values = runner.infer_on_device({k: v[:8] for k, v in inputs.items()})
        assert values["expression"].shape() == [8, 5]
        if fixed_buffers:  # larger than the first graph's batch: a second graph, on its own buffers
            feed = {k: v[:16] for k, v in inputs.items()}
            np.testing.assert_allclose(runner.infer(feed)["expression"], eager(a.model, feed), atol=1e-5)
            assert [g.rows for g in runner._io.graphs.graphs] == [8, 16]
    with load_runner(a.onnx) as plain, pytest.raises(InputError, match="IO binding"):
        plain.infer_on_device({k: v[:2] for k, v in inputs.items()})


def test_tf32_is_asked_for_and_reported(artifacts, tmp_path):
    """fp32 means fp32 on the GPU backends; --tf32 turns the tensor cores on, and parity then uses the tf32 row."""
    from deepspot.runtime.backends import _build

    a = artifacts()
    for tf32 in (False, True):
        runner = _build(a.onnx, "onnx", "ort-cuda", RunnerOptions(tf32=tf32))  # built, not activated: no GPU needed
        cuda = next(p[1] for p in runner.providers if p[0] == "CUDAExecutionProvider")
        assert cuda["use_tf32"] == ("1" if tf32 else "0")
        assert runner.info.precision == ("tf32" if tf32 else "fp32")
    for backend in ("ort-cpu", "torch"):
        with pytest.raises(ConfigError, match=f"tf32 is a math mode of NVIDIA GPUs; the {backend} backend runs on"):
            load_runner(a.onnx if backend == "ort-cpu" else a.checkpoint, backend, RunnerOptions(tf32=True))


def test_cuda_graph_options_and_a_graph_onnxruntime_cannot_capture(artifacts, monkeypatch):
    import onnxruntime

    from deepspot.runtime import ort as ort_module

    a = artifacts()
    with pytest.raises(ConfigError, match="CUDA graphs are replayed by the onnxruntime GPU backends .*not ort-cpu"):
        load_runner(a.onnx, "ort-cpu", RunnerOptions(cuda_graph=True))
    with load_runner(a.onnx, "ort-cpu", RunnerOptions(cuda_graph=False)) as runner:  # off is what it is anyway
        assert runner.infer({k: v[:2] for k, v in a.inputs().items()})["expression"].shape == (2, 5)

    def refuse(*args, **kwargs):  # what onnxruntime says when a node cannot run inside a CUDA graph
        raise RuntimeError("This session cannot use the graph capture feature as requested by the user as all compute "
                           "graph nodes have not been partitioned to the CUDAExecutionProvider\ndetails")  # fmt: skip

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(ConfigError, match=r"cannot capture it as a CUDA graph \(This session .*\); run it without "
                                          r"\(RunnerOptions\(cuda_graph=False\)\)$") as error:  # fmt: skip
        ort_module.session_from_onnx(a.onnx)
    assert "\n" not in str(error.value)


def test_runner_options_are_named_as_python_gives_them_and_as_flags_on_the_command_line(artifacts, tmp_path):
    from typer.testing import CliRunner

    from deepspot.cli import app

    from _cli import error_line

    a = artifacts()
    with pytest.raises(ConfigError, match="^device must be at least 0, got -1$"):
        RunnerOptions(device=-1)
    with pytest.raises(ConfigError) as e:
        load_runner(a.onnx, "ort-cpu", RunnerOptions(precision="fp16"))
    assert "onnxruntime runs it as exported, so export it with precision='fp16' (or use" in str(e.value)
    args = ["infer", str(a.onnx), "-i", str(a.bundle), "-o", str(tmp_path / "p.npy")]
    error_line(CliRunner().invoke(app, [*args, "--precision", "fp16"]),
               "onnxruntime runs it as exported, so export it with --precision fp16 (or use")  # fmt: skip
