"""The GPU suite: everything issue 9 asks of a GPU, in one command that fits a short device lease.

    python benchmarks/gpu_suite.py --out DIR [--budget 360] [--smoke]

Steps, each written to ``DIR/gpu_suite.json`` and ``DIR/gpu_suite.md`` as soon as it ends, and the long ones after each
case or run too (status ``running``: a time-out keeps what was done); a step, case or run that fails records its error
and the suite goes on:

1. ``doctor``: versions, GPU, driver, CUDA and cuDNN libraries, and which backends run;
2. ``bandwidth``: host-to-device copies from page-locked and from pageable memory (256 MiB, median of 5), and the
   host's staging copies on 1-8 threads and the default count (``benchmarks/staging_copy.py``);
   ``gemm``: the GPU's matrix-product rate at fp32, TF32 and fp16 (each throughput row's ``arithmetic_limit``) and
   its memory bandwidth (with the graph's memory traffic per item, each ONNX row's ``memory_limit``);
3. ``parity``: ``ort-cuda`` (fp32, tf32, fp16) and ``torch-cuda`` (fp32, tf32, fp16, bf16) against the eager fp32
   model on the CPU, every forward mode of both families (at reduced sizes), and the indexed layout;
4. ``throughput``: ``visium-uni`` on ``ort-cuda`` (with and without CUDA graphs), ``torch-cuda`` (the exporter's
   graph) and eager PyTorch on the GPU, with fp32 and fp16 features (the torch runners take fp16 features as they
   are and cast them on the GPU), through the overlapping pipeline, each with
   ``fraction_of_limit`` = items/s / (pinned bandwidth / input bytes per item); fp32 features also with TF32 products
   and with an fp16 graph (strict fp32 arithmetic may bound them below the bus), and for each ``ort-cuda`` row the
   rate of the graph alone on a batch already on the device (``resident_items_per_s``): what bounds it, measured;
   each row's ``ratio_to_eager`` pairs its timed repeats with eager PyTorch (fp32 features) timed just before each
   of them, alternating as ``deepspot bench`` does;
5. ``slides``: the whole-slide workloads (``xenium-slide`` at 100,000 cells, ``visium-slide``) in the indexed
   layout on ``ort-cuda`` and ``torch-cuda``, with the same fraction (only each item's own tiles cross the bus).

The steps run in one child process; the command itself only supervises it. If the child dies (a segfault in a native
library, an abort, a kill) the step it was running is recorded as failed ("the process died: signal 11 (SIGSEGV)"), with
the cases it had recorded, and a fresh child resumes with the next step; after a sticky CUDA error (an illegal memory
access, a launch failure, a device-side assert: every later CUDA call of the process would fail, see ``_poisons_cuda``)
the child records the step as failed and exits with status 3, and a fresh one resumes likewise (such an error in one
case or row ends its step: the later ones would fail too). A resumed child takes the earlier steps' results from the
JSON, and the budget and its shares stay counted from the suite's start; at most one restart per step, none once the
budget is spent. A child still in a step 45 s after that step's share of the budget ended (``HANG_GRACE``), and 45 s
after it last recorded a case where that is later (slow, not hung; never past the whole budget), is taken for hung,
killed, and the step recorded as failed in the same way. When nothing fails, one child runs everything. ``DEEPSPOT_GPU_SUITE_FAULT=step:kind`` is a test hook
only (see ``FAULT``).

``--smoke`` runs the same plumbing on the CPU at toy sizes (GPU steps are recorded as skipped, with the reason), so
the suite is tested where there is no GPU. Written without a GPU at hand: the first run on one is its test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/staging_copy.py

MODES = {"spot": ("spot", "subspot", "neighbors", "subspot_neighbors"), "cell": ("cell", "neighbors")}


#: The steps, in the order they run.
STEPS = ("doctor", "bandwidth", "gemm", "parity", "throughput", "slides")
#: A step's status once it has ended: a fresh process resuming the suite does not run it again.
DONE = ("ok", "failed", "skipped")
#: The child's exit status after a step failed with a sticky CUDA error: the supervisor resumes in a fresh process.
POISONED = 3
#: A test hook only: ``step:kind`` makes the child fail at step ``step``'s first recorded case (or at its end, for a
#: step that records none): ``segv`` and ``kill`` kill the process by that signal,
#: ``poison`` raises a sticky CUDA error's message, anything else an ordinary error.
FAULT = "DEEPSPOT_GPU_SUITE_FAULT"
#: Seconds a child may run past the end of its step's share of the budget (a case started just before the end runs
#: to its end) before the supervisor takes it for hung, kills it and resumes with the next step. Below the 60 s
#: between the default budget and the runbook's outer ``timeout 420``, so that the supervisor writes first.
HANG_GRACE = 45.0


def step_deadline(name: str, budget: float) -> float:
    """Seconds from the suite's start at which step ``name``'s share of the budget ends: parity (and the short steps
    before it) a third, throughput the next third, the slides what is left."""
    share = budget / 3
    return {"throughput": 2 * share, "slides": budget}.get(name, share)

# The CUDA errors after which every later CUDA call of the process fails (the context is lost), as torch
# ("CUDA error: <text>"), onnxruntime ("CUDA failure 700: <text>", "CUDA error cudaErrorIllegalAddress:<text>") and
# deepspot.runtime.cuda_libs ("<call> failed: <text> (error 700)") word them: the runtime's texts, enum names and codes.
_STICKY_TEXTS = ("an illegal memory access was encountered", "unspecified launch failure", "misaligned address",
                 "device-side assert triggered", "an illegal instruction was encountered", "hardware stack error",
                 "invalid program counter", "operation not supported on global/shared address space")  # fmt: skip
_STICKY_NAMES = ("cudaErrorIllegalAddress", "cudaErrorLaunchFailure", "cudaErrorMisalignedAddress", "cudaErrorAssert",
                 "cudaErrorIllegalInstruction", "cudaErrorHardwareStackError", "cudaErrorInvalidPc",
                 "cudaErrorInvalidAddressSpace", "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED",
                 "CUDA_ERROR_MISALIGNED_ADDRESS", "CUDA_ERROR_ASSERT", "CUDA_ERROR_ILLEGAL_INSTRUCTION",
                 "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_INVALID_PC",
                 "CUDA_ERROR_INVALID_ADDRESS_SPACE")  # fmt: skip
_STICKY_CODES = (700, 710, 714, 715, 716, 717, 718, 719)


def _poisons_cuda(error: BaseException | str) -> bool:
    """Whether ``error`` (an exception or its message) is a sticky CUDA error: one after which every CUDA call of
    the process fails, so that the suite must go on in a fresh process. The exceptions it was raised from or while
    handling count too (a runner's clean-up failing after the sticky error may be the one that arrives)."""
    seen: list[BaseException | str] = []
    while error is not None and len(seen) < 8 and not any(error is s for s in seen):
        seen.append(error)
        text = str(error)
        if any(t in text for t in _STICKY_TEXTS) or any(n in text for n in _STICKY_NAMES):
            return True
        if any(f"CUDA failure {c}" in text or f"(error {c})" in text for c in _STICKY_CODES):
            return True
        error = None if isinstance(error, str) else (error.__cause__ or error.__context__)
    return False


class _Poisoned(Exception):
    """A step failed with a sticky CUDA error: it is recorded, and the process must not run another step."""


class Suite:
    """Runs steps within a time budget and writes the results after each one.

    ``start`` is the suite's start on ``time.perf_counter()``'s clock (a resumed process passes the first one's, so
    that the budget and its shares stay absolute); ``resume`` reads ``out/gpu_suite.json`` and skips the steps it
    says have ended, returning their recorded results."""

    def __init__(self, out: Path, budget: float, smoke: bool, start: float | None = None, resume: bool = False):
        self.out, self.budget, self.smoke = out, budget, smoke
        self.start = time.perf_counter() if start is None else start
        self._faulted = False
        self.results: dict[str, Any] = {
            "suite": "deepspot gpu_suite",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "smoke": smoke,
            "host": platform.node(),
            "steps": {},
        }
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads((out / "gpu_suite.json").read_text())
                if isinstance(saved.get("steps"), dict):
                    self.results = saved

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def step(self, name: str, fn, *args) -> Any:
        """Runs step ``name`` (unless it has ended already: then its recorded result). A sticky CUDA error is
        recorded and raised (as ``_Poisoned``): the process must not run another step."""
        done = self.results["steps"].get(name) or {}
        if done.get("status") in DONE:
            return done.get("result")
        if self.left() <= 0:
            self.results["steps"][name] = {"status": "skipped", "reason": "time budget spent"}
        else:
            # Marked running before it starts: if the process dies in it, the supervisor knows which step it was.
            self.results["steps"][name] = {"status": "running", "suite_seconds": time.perf_counter() - self.start}
            self.write()
            t0 = time.perf_counter()
            try:
                value = fn(*args)
                self._fault(name)
                self.results["steps"][name] = {"status": "ok", "seconds": time.perf_counter() - t0, "result": value}
            except Exception as e:  # one failing step must not lose the others
                before = self.results["steps"].get(name) or {}
                self.results["steps"][name] = {
                    "status": "failed",
                    "seconds": time.perf_counter() - t0,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=6),
                    # what it had recorded before it failed (see partial)
                    **({"result": before["result"]} if before.get("status") == "running" and "result" in before
                       else {}),
                }
                if _poisons_cuda(e):
                    self.results["steps"][name]["restart"] = "a sticky CUDA error: the next steps run in a new process"
                    self.write()
                    raise _Poisoned(name) from e
        self.write()
        return self.results["steps"][name].get("result")

    def partial(self, name: str):
        """A callback for step ``name`` to record what it has so far (written at once: a time-out keeps it)."""

        def record(value) -> None:
            self.results["steps"][name] = {"status": "running", "suite_seconds": time.perf_counter() - self.start,
                                           "result": value}  # fmt: skip
            self.write()
            self._fault(name)

        return record

    def _fault(self, name: str) -> None:
        """The test hook ``DEEPSPOT_GPU_SUITE_FAULT`` (see ``FAULT``): fails step ``name`` once, if it names it."""
        step, _, kind = os.environ.get(FAULT, "").partition(":")
        if step != name or self._faulted:
            return
        self._faulted = True
        if kind in ("segv", "kill"):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))  # no core file
            os.kill(os.getpid(), signal.SIGSEGV if kind == "segv" else signal.SIGKILL)
        if kind == "poison":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test hook)")
        raise RuntimeError(f"a fault injected by the test hook ({kind})")

    def write(self) -> None:
        # Written to a temporary file and renamed: a process killed while writing leaves the previous JSON whole.
        path = self.out / "gpu_suite.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, path)
        try:
            text = markdown(self.results)
        except Exception as e:  # noqa: BLE001  the JSON holds everything; a table that fails must not stop the suite
            text = f"# deepspot GPU suite\n\nThe table could not be written ({type(e).__name__}: {e}); see the JSON.\n"
        (self.out / "gpu_suite.md").write_text(text)


def cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, torch.cuda.get_device_name(0)


# -- steps ------------------------------------------------------------------------------------------------------------
def doctor() -> dict:
    from deepspot.runtime.doctor import diagnose

    return diagnose().to_dict()


def bandwidth(smoke: bool) -> dict:
    # The host's side of the pipeline: staging copies into page-locked buffers (and predictions out of them) on 1 to
    # 8 threads. If their rate is below the pinned bandwidth, the staging copy, not the bus, bounds a row.
    from staging_copy import measure

    staging = measure(mib=16 if smoke else 256, repeats=3 if smoke else 5)
    ok, why = cuda_available()
    if not ok:
        return {"skipped": why, "host_staging_copy": staging}
    # The product's own probe (the CUDA runtime through ctypes, as the ort-cuda pipeline uses it): if it fails here,
    # that pipeline cannot run either.
    from deepspot.runtime.bench_common import bus_bandwidth

    return {**bus_bandwidth(nbytes=(16 if smoke else 256) << 20), "host_staging_copy": staging}


def _model(family: str, mode: str, smoke: bool, seed: int = 0):
    import deepspot

    size = (dict(input_size=16, output_size=8, phi2rho_size=8) if smoke
            else dict(input_size=256, output_size=500, phi2rho_size=128))  # fmt: skip
    extra = {"agg_neighbors": "max"} if family == "cell" else {}
    return deepspot.create_model(family, mode, n_ensemble=10, random_seed=seed, **size, **extra)


def gemm(smoke: bool) -> dict:
    """The GPU's matrix-product rate (TFLOP/s) for each arithmetic a throughput row uses: strict fp32, TF32 and fp16,
    on the BENCHMARKS.md product (4096 x 1024 by 1024 x 5120), median of 10 after warm-up. Dividing by a workload's
    FLOPs per item gives the rate its arithmetic allows."""
    ok, why = cuda_available()
    if not ok:
        return {"skipped": why}
    import torch

    m, k, n = (256, 256, 256) if smoke else (4096, 1024, 5120)
    out = {}
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        kinds = (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("fp16", torch.float16, False))
        for name, dtype, tf32 in kinds:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(m, k, device="cuda", dtype=dtype)
            b = torch.randn(k, n, device="cuda", dtype=dtype)
            times = []
            for _ in range(12):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.matmul(a, b)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"{name}_tflops"] = 2.0 * m * k * n / statistics.median(times[2:]) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    # The GPU's memory bandwidth, bytes read plus written by a device-to-device copy: over a graph's memory traffic
    # per item (deepspot.export.info.traffic_per_item), what the unfused elementwise work (the median) allows.
    nbytes = (16 if smoke else 1024) << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["hbm_gb_per_s"] = 2 * nbytes / statistics.median(times[2:]) / 1e9
    return out


def _over(until: float | None) -> bool:
    """Whether a step's share of the time budget is spent (its remaining cases are then recorded as skipped)."""
    return until is not None and time.perf_counter() > until


SPENT = {"skipped": "this step's share of the time budget was spent"}


def parity(smoke: bool, work: Path, until: float | None = None, partial=None) -> dict:
    import deepspot
    from deepspot.export import export_onnx
    from deepspot.export.indexed import export_indexed
    from deepspot.runtime import RunnerOptions, check_parity
    from deepspot.runtime.parity import check_parity_indexed

    ok, why = cuda_available()
    cases = {}
    for family, modes in MODES.items():
        for mode in modes[-1:] if smoke else modes:  # smoke: the full mode of each family
            if _over(until):
                cases[f"{family}/{mode}"] = SPENT
                continue
            model = _model(family, mode, smoke)
            ckpt = deepspot.save(model, work / f"{family}-{mode}.safetensors")
            runs = [("torch-cuda", p, ckpt, RunnerOptions(precision=p)) for p in ("fp32", "fp16", "bf16")]
            runs.append(("torch-cuda", "tf32", ckpt, RunnerOptions(tf32=True)))
            for precision in ("fp32", "fp16"):
                path = work / f"{family}-{mode}-{precision}.onnx"
                export_onnx(model, path, precision=precision, validate=False)
                runs.append(("ort-cuda", precision, path, None))
            runs.append(("ort-cuda", "tf32", work / f"{family}-{mode}-fp32.onnx", RunnerOptions(tf32=True)))
            if smoke:  # the same calls on the CPU backends
                runs = [("torch", "fp32", ckpt, None), ("ort-cpu", "fp32", work / f"{family}-{mode}-fp32.onnx", None)]
            elif not ok:
                cases[f"{family}/{mode}"] = {"skipped": why}
                continue
            for backend, precision, target, options in runs:
                n = 64 if smoke else 512
                cases[f"{family}/{mode} {backend} {precision}"] = _case(
                    lambda o, c=ckpt, t=target, b=backend, k=n: check_parity(c, t, b, n_random=k, options=o), options)
                if partial is not None:  # after each case: the supervisor sees a slow step progressing, not hung
                    partial(cases)
            if "neighbors" in mode:
                folder = work / f"{family}-{mode}-indexed"
                export_indexed(model, folder, validate=False)
                backends = ("ort-cpu", "torch") if smoke else ("ort-cuda", "torch-cuda")
                for backend in backends:
                    target = folder if backend.startswith("ort") else ckpt
                    k = 64 if smoke else 2048
                    check = lambda o, c=ckpt, t=target, b=backend, k=k: check_parity_indexed(  # noqa: E731
                        c, t, b, n_random=k, options=o)  # fmt: skip
                    cases[f"{family}/{mode} indexed {backend}"] = _case(check, None)
            if partial is not None:
                partial(cases)
    return cases


def _case(check, options) -> dict:
    """One parity case; an error is recorded in its row and the others go on (a sticky CUDA error is raised: see
    ``_poisons_cuda``). If onnxruntime cannot capture a CUDA graph of the model, the case runs again without one, and
    the row says so."""
    from dataclasses import replace

    from deepspot.runtime import RunnerOptions

    try:
        return _parity_row(check(options))
    except Exception as e:  # one case must not lose the others
        if _poisons_cuda(e):  # every later case would fail too: the step ends, the next runs in a fresh process
            raise
        if not _cannot_capture(e):
            return {"passed": False, "max_abs": None, "error": f"{type(e).__name__}: {e}"}
        first = f"{type(e).__name__}: {e}"
    try:
        row = _parity_row(check(replace(options or RunnerOptions(), cuda_graph=False)))
    except Exception as e:
        if _poisons_cuda(e):
            raise
        row = {"passed": False, "max_abs": None, "error": f"{type(e).__name__}: {e}"}
    return {**row, "without CUDA graphs, because": first}


def _cannot_capture(e: BaseException) -> bool:
    """Whether ``e`` says a CUDA graph could not be made: refused when the session was made (the runner's
    ConfigError), or failing while onnxruntime captured it (a CUDA error raised from the run, such as
    "operation not permitted when stream is capturing", or onnxruntime's "cudaStreamEndCapture" / "Graph capture")."""
    text = str(e)
    return "CUDA graph" in text or "captur" in text.lower()


def _parity_row(report) -> dict:
    d = report.to_dict()
    outputs = d.get("outputs") or []
    worst = max((o.get("max_abs", 0.0) for o in outputs), default=None) if outputs else None
    return {"passed": report.passed, "max_abs": worst, "summary": report.summary()}


def _inputs(w, n: int, dtype) -> dict[str, np.ndarray]:
    """The workload's seeded random features for ``n`` items, as ``dtype`` (fp16 features halve the bytes)."""
    return {k: v.astype(dtype, copy=False) for k, v in w.inputs(n, seed=0).items()}


def _features(w, n: int, features: str, made: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The seeded features in ``features`` (fp32 or fp16): cast from the other dtype's if that was made already (at
    GPU sizes drawing them takes tens of seconds, casting a few)."""
    dtype = np.float16 if features == "fp16" else np.float32
    if made:
        return {k: v.astype(dtype) for k, v in next(iter(made.values())).items()}
    return _inputs(w, n, dtype)


def _resident(runner, inputs: dict[str, np.ndarray], batch: int) -> float | None:
    """The graph alone on one batch already on the device (items/s): what bounds the pipeline if not the bus."""
    if not hasattr(runner, "resident_rate") or getattr(runner, "_io", None) is None:
        return None
    return runner.resident_rate({k: v[:batch] for k, v in inputs.items()}, repeats=20)


def _time_predict(runner, inputs: dict[str, np.ndarray], batch: int, repeats: int,
                  baseline=None) -> tuple[float, list[float]]:  # fmt: skip
    """The median rate of ``repeats`` timed runs over ``inputs``, and with ``baseline`` (:class:`_Eager`) timed before
    each of them, the paired per-repeat ratios to it (alternating: drift hits both alike)."""
    from deepspot.runtime.stream import predict

    n = next(iter(inputs.values())).shape[0]
    out = np.empty((n, runner.info.output_size), np.float32)
    predict(runner, {k: v[: batch * 2] for k, v in inputs.items()}, batch)  # warm-up: sessions, graphs, allocator
    rates, ratios = [], []
    for _ in range(repeats):
        base = baseline.run() if baseline is not None else None
        t0 = time.perf_counter()
        predict(runner, inputs, batch, out=out)
        rates.append(n / (time.perf_counter() - t0))
        if base:
            ratios.append(rates[-1] / base)
    return statistics.median(rates), ratios


class _Eager:
    """The eager model with fp32 features, the baseline of the throughput rows' "x eager": timed before each timed
    repeat of every other row, as ``deepspot bench`` and the whole-slide rows alternate their contenders. Two batches
    per run keep it to a fraction of a second (its own row streams more)."""

    def __init__(self, model, backend: str, inputs: dict[str, np.ndarray], batch: int):
        from deepspot.runtime import RunnerOptions, load_runner

        self.runner = load_runner(model, backend, RunnerOptions()).activate()
        self.inputs, self.batch = inputs, batch
        self.n = next(iter(inputs.values())).shape[0]
        self.out = np.empty((self.n, self.runner.info.output_size), np.float32)
        self.rates: list[float] = []
        try:
            self.run()  # warm-up
        except BaseException:
            self.close()
            raise
        self.rates = []

    def run(self) -> float:
        from deepspot.runtime.stream import predict

        t0 = time.perf_counter()
        predict(self.runner, self.inputs, self.batch, out=self.out)
        self.rates.append(self.n / (time.perf_counter() - t0))
        return self.rates[-1]

    def close(self) -> None:
        self.runner.deactivate()


def throughput(smoke: bool, work: Path, bw: dict | None, rates: dict | None = None,
               until: float | None = None, partial=None) -> dict:  # fmt: skip
    from deepspot.export import export_onnx
    from deepspot.runtime import RunnerOptions
    from deepspot.runtime.bench import get_workload

    ok, why = cuda_available()
    w = get_workload("visium-uni")
    if smoke:
        w = w.quick()
    model = w.build_model(0)
    n = 4 * (w.batch_cpu if smoke else w.batch_gpu) * (1 if smoke else 8)
    batch = w.batch_cpu if smoke else w.batch_gpu
    pinned = (bw or {}).get("pinned_gb_per_s")
    rows = {}
    variants = []
    paths = {}
    for name, io, precision in (("fp32", None, "fp32"), ("fp16", "fp16", "fp16"), ("fp16-compute", None, "fp16")):
        paths[name] = work / f"visium-{name}.onnx"  # features: fp32, fp16, fp32 (cast to fp16 in the graph)
        export_onnx(model, paths[name], io_dtype=io, precision=precision, validate=False)
    for features in ("fp32", "fp16"):
        path = paths[features]
        if smoke:
            variants.append((f"ort-cpu {features} features", path, "ort-cpu", None, features))
            continue
        variants += [
            (f"ort-cuda {features} features, CUDA graph", path, "ort-cuda",
             RunnerOptions(cuda_graph=True, batch_size=batch), features),
            (f"ort-cuda {features} features, no CUDA graph", path, "ort-cuda",
             RunnerOptions(cuda_graph=False, batch_size=batch), features),
        ]
    if not smoke:  # fp32 on the bus, faster math: TF32 products, or an fp16 graph that casts the features
        tf32, plain = RunnerOptions(tf32=True, batch_size=batch), RunnerOptions(batch_size=batch)
        variants += [
            ("ort-cuda fp32 features, TF32, CUDA graph", paths["fp32"], "ort-cuda", tf32, "fp32"),
            ("ort-cuda fp32 features, fp16 graph, CUDA graph", paths["fp16-compute"], "ort-cuda", plain, "fp32"),
            # The staging copies on one thread, as before they were split: what the threads add, side by side.
            ("ort-cuda fp32 features, CUDA graph, 1 staging thread", paths["fp32"], "ort-cuda",
             RunnerOptions(cuda_graph=True, batch_size=batch), "fp32", 1),
        ]
    ckpt_variants = [("torch eager", "torch", RunnerOptions(), "fp32"),
                     ("torch eager, fp16 features", "torch", RunnerOptions(io="fp16"), "fp16")] if smoke else [
        ("torch-cuda eager (GPU)", "torch-cuda", RunnerOptions(), "fp32"),
        ("torch-cuda eager (GPU), fp16 features", "torch-cuda", RunnerOptions(io="fp16"), "fp16"),
        ("torch-cuda export graph fp32", "torch-cuda", RunnerOptions(torch_graph="export"), "fp32"),
        ("torch-cuda export graph fp32, fp16 features", "torch-cuda", RunnerOptions(torch_graph="export", io="fp16"),
         "fp16"),
        ("torch-cuda export graph fp16, fp16 features", "torch-cuda",
         RunnerOptions(torch_graph="export", precision="fp16", io="fp16"), "fp16"),
        # torch.compile fuses the median network's Min/Max passes (onnxruntime's CUDA provider runs them one by one):
        # whether fusion lifts the memory limit. Last, and only with a minute of the step's share left (it compiles).
        ("torch-cuda export graph fp16, fp16 features, compiled", "torch-cuda",
         RunnerOptions(torch_graph="export", precision="fp16", io="fp16", compile=True), "fp16"),
    ]  # fmt: skip
    if not smoke and not ok:
        return {"skipped": why}
    features_by_dtype = {"fp32": _features(w, n, "fp32", {})}  # made once per dtype: at GPU sizes they are gigabytes
    result = {"workload": w.name, "items": n, "batch": batch, "rows": rows}
    own_row = ckpt_variants[0][0]  # the baseline's own row, timed on its own
    try:
        eager = _Eager(model, ckpt_variants[0][1], {k: v[: 2 * batch] for k, v in features_by_dtype["fp32"].items()},
                       batch)  # fmt: skip
        result["eager_baseline"] = f"{own_row}, {eager.n} items per run, before each repeat of every row"
    except Exception as e:  # the rows go on, their "x eager" then from the eager row's rate
        if _poisons_cuda(e):
            raise
        eager, result["eager_baseline"] = None, _error_row(e)

    def record(name: str, row: dict) -> None:
        rows[name] = row
        if partial is not None:
            partial(result)

    try:
        for name, path, backend, options, features, *threads in variants:
            if _over(until):
                record(name, SPENT)
                continue
            if features not in features_by_dtype:
                features_by_dtype[features] = _features(w, n, features, features_by_dtype)
            inputs = features_by_dtype[features]
            from staging_copy import copy_threads_env

            with copy_threads_env(threads[0] if threads else None):
                record(name, _row(_measure, path, backend, options, inputs, batch, smoke, rates, w, n, pinned, eager))
        for name, backend, options, features in ckpt_variants:
            if _over(until) or (options.compile and until is not None and until - time.perf_counter() < 60):
                record(name, SPENT)
                continue
            if features not in features_by_dtype:
                features_by_dtype[features] = _features(w, n, features, features_by_dtype)
            inputs, m = features_by_dtype[features], n
            if "eager" in name and not smoke:  # ~30k spots/s: a quarter of the items (8 batches) keeps it to seconds
                m = n // 4
                inputs = {k: v[:m] for k, v in inputs.items()}
            paired = None if name == own_row else eager
            record(name, _row(_measure, model, backend, options, inputs, batch, smoke, rates, w, m, pinned, paired))
    finally:
        if eager is not None:
            eager.close()
    return result


def _row(measure, *args) -> dict:
    """One throughput row, ``measure(*args)``; an error is recorded in it and the other rows go on (a sticky CUDA
    error is raised: the step ends, and the next runs in a fresh process)."""
    try:
        return measure(*args)
    except Exception as e:
        if _poisons_cuda(e):
            raise
        return _error_row(e)


def _measure(source, backend, options, inputs, batch, smoke, rates, w, n, pinned, baseline=None) -> dict:
    from deepspot.runtime import load_runner
    from deepspot.runtime.bench_common import computes_folded
    from deepspot.runtime.pipeline import stages_ahead

    with load_runner(source, backend, options) as runner:
        rate, paired = _time_predict(runner, inputs, batch, 3 if smoke else 5, baseline)
        pipeline = runner.pipeline_adapter(batch)
        how = {
            # the median of the per-repeat ratios to the eager baseline timed just before each repeat
            "ratio_to_eager": statistics.median(paired) if paired else None,
            "resident_items_per_s": _resident(runner, inputs, batch),
            # The overlapping pipeline needs the CUDA runtime (ctypes for onnxruntime, PyTorch's for torch-cuda);
            # without it predict() runs batch by batch (deepspot doctor says why). Recorded, so that a slow row is
            # not misread.
            "pipelined": pipeline is not None,
            # Whether the pipeline staged batch i + 1's copy to the GPU before it submitted batch i (ort-cuda with
            # CUDA graphs: onnxruntime waits for the GPU after each replay, so the copy could not overlap otherwise).
            "staged_ahead": pipeline is not None and stages_ahead(pipeline[0]),
            "providers": runner.session.get_providers() if getattr(runner, "session", None) else None,
            "precision": runner.info.precision,
        }
        tflops = (rates or {}).get(f"{runner.info.precision}_tflops")
        if tflops:  # what the arithmetic allows: the GEMM rate over the FLOPs this runner computes per spot (the
            # folded graph's; eager PyTorch runs every Rho of the ensemble, as `deepspot bench` counts it)
            how["arithmetic_limit_items_per_s"] = tflops * 1e12 / w.flops_per_item(folded=computes_folded(runner))
        hbm = (rates or {}).get("hbm_gb_per_s")
        if isinstance(source, Path):  # an ONNX graph: what its memory traffic allows, run unfused
            from deepspot.export.info import traffic_per_item

            how["memory_bytes_per_item"] = traffic_per_item(source, batch, dict(w.bags))
            if hbm:
                how["memory_limit_items_per_s"] = hbm * 1e9 / how["memory_bytes_per_item"]
    return {**_rate_row(rate, inputs, n, pinned), **how}


def _rate_row(rate: float, inputs: dict[str, np.ndarray], n: int, pinned: float | None) -> dict:
    from deepspot.runtime.bench_common import bus_fraction

    per_item = sum(a[:1].nbytes for a in inputs.values())
    return {
        "items_per_s": rate,
        "input_bytes_per_item": per_item,
        "bus_limit_items_per_s": None if pinned is None else pinned * 1e9 / per_item,
        "fraction_of_limit": bus_fraction(rate, per_item, pinned),
    }


#: Timed repeats of each whole-slide run: BENCHMARKS.md asks for the median of at least 5 (a repeat is a second or so).
SLIDE_REPEATS = 5


def slides(smoke: bool, until: float | None = None, partial=None) -> dict:
    """The whole-slide rows. A run that fails is recorded in its row and the other runs go on; where two backends
    ran together, each runs again alone, so that one failing backend does not lose the other's row. Runs not started
    by ``until`` are recorded as skipped, and ``partial(out)`` is called after each run (a time-out keeps them)."""
    from deepspot.runtime.bench import get_workload

    ok, why = cuda_available()
    if not smoke and not ok:
        return {"skipped": why}
    out = {}
    # The workload's GPU batch (what deepspot infer uses there), and for xenium-slide also 4096 cells: an indexed
    # batch carries one tile per cell, so a larger one costs little memory and may amortise the per-batch overhead.
    runs = [("xenium-slide", 100_000, None), ("xenium-slide", 100_000, 4096), ("visium-slide", 20_000, None)]
    for name, n, batch in runs[:1] if smoke else runs:
        w = get_workload(name)
        if smoke:
            w, n = w.quick(), 2000
        backends = ["ort-cpu"] if smoke else ["ort-cuda"] if batch else ["ort-cuda", "torch-cuda"]
        repeats = 2 if smoke else SLIDE_REPEATS
        rows = out.setdefault(name, {"items": n, "rows": {}})["rows"]
        label = f"batch {batch}" if batch else "the workload's batch"
        if _over(until):
            rows[f"{', '.join(backends)}, {label}"] = SPENT
            continue
        reports = []
        try:
            reports.append(_slide_bench(w, backends, batch, repeats, n))
        except Exception as e:  # recorded in its row; the other runs go on
            if _poisons_cuda(e):  # unless the process's CUDA context is lost
                raise
            rows[f"{', '.join(backends)}, {label}"] = _error_row(e)
            for backend in backends if len(backends) > 1 else ():  # each alone: which one failed, and the other's row
                try:
                    reports.append(_slide_bench(w, [backend], batch, repeats, n))
                except Exception as e:
                    if _poisons_cuda(e):
                        raise
                    rows[f"{backend} alone, {label}"] = _error_row(e)
        for report, without_graphs in reports:
            # The bench's own bus figures: the bandwidth it measured, and the bytes that cross per item (the indexed
            # layout: own tiles and neighbour indices; the per-item baseline: every tile).
            pinned = (report.bus_gb_per_s or {}).get("pinned_gb_per_s")
            out[name]["eager_baseline"] = report.baseline  # what the ratios are to
            for r in report.results:
                if batch and "indexed" not in r.backend:
                    continue  # the per-item baseline is measured once, in the workload-batch run
                rows[f"{r.backend}, batch {r.batch_size}"] = {
                    "items_per_s": r.items_per_s,
                    "ratio_to_eager_per_item": r.ratio_to_torch,
                    "input_bytes_per_item": r.input_bytes_per_item,
                    "bus_limit_items_per_s": pinned * 1e9 / r.input_bytes_per_item if pinned and r.input_bytes_per_item
                    else None,
                    "fraction_of_limit": r.fraction_of_bus,
                    "phases_s": r.phases_s,  # encoder pass, table to the device, head pass: what bounds the slide
                }
                if without_graphs and "indexed" in r.backend:
                    rows[f"{r.backend}, batch {r.batch_size}"]["without CUDA graphs, because"] = without_graphs
        if partial is not None:
            partial(out)
    return out


def _slide_bench(w, backends: list[str], batch: int | None, repeats: int, n: int):
    """``run_slide_bench`` and ``None``; where onnxruntime could not capture a CUDA graph of an indexed export's
    graphs, the run again without CUDA graphs and why."""
    from deepspot.runtime import RunnerOptions
    from deepspot.runtime.slide_bench import run_slide_bench

    try:
        return run_slide_bench(w, backends, batch, repeats, 1, n_items=n), None
    except Exception as e:
        if _poisons_cuda(e) or not _cannot_capture(e) or not any(b.startswith("ort") for b in backends):
            raise
        why = f"{type(e).__name__}: {e}"
    options = RunnerOptions(cuda_graph=False)
    return run_slide_bench(w, backends, batch, repeats, 1, options=options, n_items=n), why


def _error_row(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}


# -- report -----------------------------------------------------------------------------------------------------------
def _eager_rate(table: dict) -> float | None:
    """The eager PyTorch row's rate of a throughput table (on the GPU; on the CPU in a smoke run), if it ran."""
    for variant, row in (table.get("rows") or {}).items():
        if "eager" in variant and row.get("items_per_s"):
            return row["items_per_s"]
    return None


def markdown(results: dict) -> str:
    lines = [f"# deepspot GPU suite, {results['date']}{' (smoke run on the CPU)' if results['smoke'] else ''}", ""]
    steps = results["steps"]
    doc = (steps.get("doctor") or {}).get("result") or {}
    if doc:
        gpu = doc.get("gpu", {})
        v = doc.get("versions", {})
        lines += [f"GPU: {gpu.get('name') or gpu.get('torch sees') or 'none'}, driver {gpu.get('driver')}; "
                  f"onnxruntime {v.get('onnxruntime')} ({v.get('onnxruntime package')}), "
                  f"torch {v.get('torch')}", ""]  # fmt: skip
    for restart in results.get("restarts") or []:
        lines += [f"Restarted in a fresh process after: {restart.get('why')}", ""]
    for name in ("doctor", "bandwidth", "gemm"):  # the later steps' sections say their own failures
        if (steps.get(name) or {}).get("status") == "failed":
            lines += [f"{name} failed: {steps[name].get('error')}", ""]
    bw = (steps.get("bandwidth") or {}).get("result") or {}
    if bw:
        lines += [f"Host-to-device bandwidth: {json.dumps(bw)}", ""]
    rates = (steps.get("gemm") or {}).get("result") or {}
    if rates:
        lines += [f"Matrix-product rates: {json.dumps(rates)}", ""]
    for name in ("parity", "throughput", "slides"):
        step = steps.get(name)
        if not step:
            continue
        lines.append(f"## {name} ({step['status']})")
        if step["status"] in ("skipped", "failed"):
            lines += [f"{step.get('reason') or step.get('error')}", ""]
        if step.get("result") is None:  # what a failed or cut-short ("running") step had done is shown below
            continue
        result = step["result"]
        if name == "parity":
            lines += ["| case | passed | max abs error |", "| --- | --- | --- |"]
            for case, row in result.items():
                detail = row.get("error") or row.get("max_abs")
                if "without CUDA graphs, because" in row:
                    detail = f"{detail} (without CUDA graphs: {row['without CUDA graphs, because'][:120]})"
                lines.append(f"| {case} | {row.get('passed', row.get('skipped'))} | {detail} |")
        elif isinstance(result.get("skipped"), str):  # the whole step had nothing to run (no GPU)
            lines += [f"skipped: {result['skipped']}", ""]
        else:
            tables = {result.get("workload", name): result} if name == "throughput" else result
            tables = {workload: table for workload, table in tables.items() if isinstance(table, dict)}
            lines += ["| workload | variant | items/s | fraction of bus limit | x eager | graph alone on the device, "
                      "items/s | arithmetic limit, items/s | memory limit, items/s |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
            for workload, table in tables.items():
                eager = _eager_rate(table)
                for variant, row in (table.get("rows") or {}).items():
                    if "skipped" in row or "error" in row:
                        what = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row['error'][:160]}"
                        lines.append(f"| {workload} | {variant} | {what} | | | | | |")
                        continue
                    frac, resident = row.get("fraction_of_limit"), row.get("resident_items_per_s")
                    arithmetic = row.get("arithmetic_limit_items_per_s")
                    memory = row.get("memory_limit_items_per_s")
                    ratio = (row.get("ratio_to_eager_per_item") or row.get("ratio_to_eager")
                             or (row["items_per_s"] / eager if eager else None))  # fmt: skip
                    lines.append(f"| {workload} | {variant} | {row['items_per_s']:,.0f} | "
                                 f"{'-' if frac is None else f'{frac:.0%}'} | "
                                 f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                                 f"{'-' if resident is None else f'{resident:,.0f}'} | "
                                 f"{'-' if arithmetic is None else f'{arithmetic:,.0f}'} | "
                                 f"{'-' if memory is None else f'{memory:,.0f}'} |")  # fmt: skip
            for workload, table in tables.items():
                # Both tables alternate their repeats with the eager baseline (the whole-slide bench, and the
                # throughput rows each paired with a baseline run before every repeat), unless the baseline failed.
                paired = table.get("eager_baseline")
                if isinstance(paired, str):
                    how = "" if name == "slides" else " (the median of per-repeat ratios, alternated)"
                    lines.append(f"\n{workload}: x eager is against {paired}{how}")
                    continue
                baseline = next(
                    (v for v in (table.get("rows") or {}) if "eager" in v and "items_per_s" in table["rows"][v]), None)
                if baseline:
                    lines.append(f"\n{workload}: x eager is against {baseline} (timed in the same run, one row after "
                                 "another, not alternated)")  # fmt: skip
            for workload, table in tables.items():
                for variant, row in (table.get("rows") or {}).items():
                    if row.get("phases_s"):
                        phases = ", ".join(f"{k} {v:.3f} s" for k, v in row["phases_s"].items())
                        lines.append(f"\n{workload}, {variant}, per slide: {phases}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu_suite.json and gpu_suite.md.")
    parser.add_argument("--budget", type=float, default=360.0, help="Seconds; steps not started by then are skipped.")
    parser.add_argument("--smoke", action="store_true", help="Toy sizes on the CPU: tests the plumbing.")
    # The supervisor's calls of its child process (not for use by hand).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)  # time.time() at the start
    parser.add_argument("--hang-grace", type=float, default=HANG_GRACE, help=argparse.SUPPRESS)  # see HANG_GRACE
    parser.add_argument("--work-root", type=Path, default=None, help=argparse.SUPPRESS)  # the supervisor's folder
    args = parser.parse_args(argv)
    if not args.child:
        return supervise(args)
    rc = run_steps(args)
    if rc == POISONED:  # the JSON is written; a lost CUDA context's clean-up at exit could crash or hang: skip it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def run_steps(args) -> int:
    """The child: the steps that ``gpu_suite.json`` does not say have ended, in this process; ``POISONED`` when one
    failed with a sticky CUDA error."""
    start = None if args.started_at is None else time.perf_counter() - (time.time() - args.started_at)
    suite = Suite(args.out, args.budget, args.smoke, start=start, resume=True)
    # The exported graphs go into a folder of this process, removed when it ends (a resumed process makes its own),
    # inside the supervisor's, which removes what a child killed or ended by os._exit could not.
    with tempfile.TemporaryDirectory(prefix="deepspot-gpu-suite-", dir=getattr(args, "work_root", None),
                                     ignore_cleanup_errors=True) as folder:  # fmt: skip
        work = Path(folder)
        try:
            suite.step("doctor", doctor)
            bw = suite.step("bandwidth", bandwidth, args.smoke)  # a resumed process takes these from the JSON
            rates = suite.step("gemm", gemm, args.smoke)
            # Shares of the budget, so that a slow step cannot starve the next (step_deadline). Each step records the
            # cases it had no time for.
            until = {name: suite.start + step_deadline(name, args.budget) for name in STEPS}
            suite.step("parity", parity, args.smoke, work, until["parity"], suite.partial("parity"))
            suite.step("throughput", throughput, args.smoke, work, bw, rates, until["throughput"],
                       suite.partial("throughput"))  # fmt: skip
            suite.step("slides", slides, args.smoke, until["slides"], suite.partial("slides"))
        except _Poisoned:
            return POISONED
    return 0 if all(s["status"] != "failed" for s in suite.results["steps"].values()) else 1


class Hung(int):
    """A child's exit status after the supervisor killed it as hung; ``why`` says in which step."""

    why: str

    def __new__(cls, rc: int, why: str):
        self = super().__new__(cls, rc)
        self.why = why
        return self


def _run_child(args, started: float) -> int:
    """Runs the steps in a child process (a crash there does not end the supervisor); its exit status.

    A child still in a step ``args.hang_grace`` seconds after that step's share of the budget ended, and after it last
    recorded a case where that is later, is hung (a deadlocked driver call, a kernel that never ends: nothing in the
    process could stop it): it is killed, and the status says so (``Hung``), so that the next steps still run in a
    fresh child."""
    sys.stdout.flush()
    with subprocess.Popen(_child_command(args, started)) as child:
        return _watch(child, args, started)


def _watch(child, args, started: float) -> int:
    """Waits for ``child``; kills it as hung (see :func:`_run_child`) and returns :class:`Hung`, else its status.

    A step that still records cases after its share ended is slow, not hung (a case started just before the end runs
    to its end, and parity records after each): the grace then counts from its last record (the JSON's time), but
    never from later than the end of the whole budget, so that the supervisor still writes before the runbook's outer
    ``timeout``."""
    grace = getattr(args, "hang_grace", HANG_GRACE)
    while True:
        try:
            return child.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            pass
        step = _current_step(args.out)
        due = share_end = started + step_deadline(step, args.budget)
        with contextlib.suppress(OSError):
            recorded = (args.out / "gpu_suite.json").stat().st_mtime
            due = min(max(share_end, recorded), started + args.budget)
        late = time.time() - due
        if late > grace:
            child.kill()
            child.wait()
            since = "its share of the budget ended" if due == share_end else "it last recorded progress"
            return Hung(child.returncode, f"hung in {step}: killed {late:.0f} s after {since}")


def _child_command(args, started: float) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(args.out),
               "--budget", repr(args.budget), "--started-at", repr(started)]  # fmt: skip
    command += ["--smoke"] if args.smoke else []
    return command + (["--work-root", str(args.work_root)] if getattr(args, "work_root", None) else [])


def _current_step(out: Path) -> str:
    """The step the child is in, or will start next, by the JSON it writes."""
    with contextlib.suppress(OSError, ValueError):
        steps = json.loads((out / "gpu_suite.json").read_text()).get("steps") or {}
        return next((name for name in STEPS if (steps.get(name) or {}).get("status") not in DONE), STEPS[-1])
    return STEPS[-1]


def _death(rc: int) -> str:
    if rc < 0:
        try:
            return f"the process died: signal {-rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return f"the process died: signal {-rc}"
    return f"the process died: exit status {rc}"


def supervise(args, run_child=_run_child) -> int:
    """Runs the steps in a child process, and again in a fresh one after a crash or a sticky CUDA error, resuming
    with the next step (at no cost when nothing fails: one child runs them all). A step the dead child was running
    is recorded as failed, with what it had recorded. At most one restart per step, and none once the budget is
    spent; the steps not run then are recorded as skipped, with why."""
    started = time.time()
    Suite(args.out, args.budget, args.smoke).write()  # a fresh JSON (a previous run's in the folder is replaced)
    with tempfile.TemporaryDirectory(prefix="deepspot-gpu-suite-", ignore_cleanup_errors=True) as root:
        _supervise(argparse.Namespace(**{**vars(args), "work_root": root}), run_child, started)
    print((args.out / "gpu_suite.md").read_text())
    suite = Suite(args.out, args.budget, args.smoke, resume=True)
    return 0 if all(s["status"] != "failed" for s in suite.results["steps"].values()) else 1


def _supervise(args, run_child, started: float) -> None:
    """:func:`supervise`'s loop: children until every step has ended, then the steps not run recorded as skipped."""
    why_not = None
    for attempt in range(len(STEPS) + 1):
        rc = run_child(args, started)
        suite = Suite(args.out, args.budget, args.smoke, resume=True)
        steps = suite.results["steps"]
        if all((steps.get(name) or {}).get("status") in DONE for name in STEPS):
            break
        if rc == POISONED:  # the child recorded the step
            failed = next((n for n in reversed(STEPS) if "restart" in (steps.get(n) or {})), None)
            why = f"a sticky CUDA error in {failed}"
        else:
            why = rc.why if isinstance(rc, Hung) else _death(rc)
            failed = next((name for name in STEPS if (steps.get(name) or {}).get("status") == "running"), None)
            if failed is not None:  # what it had recorded stays
                before = steps[failed]
                steps[failed] = {"status": "failed", "error": why,
                                 **({"result": before["result"]} if "result" in before else {})}  # fmt: skip
        if time.time() - started >= args.budget:
            why_not = "time budget spent"
        elif attempt == len(STEPS):
            why_not = f"the suite's process ended early {attempt + 1} times; no restart left"
        else:
            suite.results.setdefault("restarts", []).append(
                {"why": why, "failed_step": failed, "suite_seconds": time.time() - started})
        suite.write()
        if why_not:
            break
    suite = Suite(args.out, args.budget, args.smoke, resume=True)
    for name in STEPS:
        if (suite.results["steps"].get(name) or {}).get("status") not in DONE:
            suite.results["steps"][name] = {"status": "skipped", "reason": why_not or "the suite's process ended early"}
    suite.write()


if __name__ == "__main__":
    sys.exit(main())
