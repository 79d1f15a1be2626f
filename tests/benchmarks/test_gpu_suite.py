"""``benchmarks/gpu_suite.py --smoke``: the suite's plumbing on the CPU (the GPU steps say why they were skipped)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _scripts import BENCHMARKS, load_script

SUITE = BENCHMARKS / "gpu_suite.py"


def _suite():
    return load_script("gpu_suite")


def test_smoke_run_writes_json_and_markdown(tmp_path, monkeypatch):
    suite = _suite()
    scratch = _scratch(tmp_path, monkeypatch)
    assert suite.main(["--out", str(tmp_path), "--smoke"]) == 0
    assert _left(scratch) == []  # the exported graphs' folders are removed when the suite ends
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = results["steps"]
    names = ("doctor", "bandwidth", "gemm", "parity", "throughput", "slides")
    assert [steps[s]["status"] for s in names] == ["ok"] * len(names)
    assert "skipped" in steps["bandwidth"]["result"] and "skipped" in steps["gemm"]["result"]  # said, not hidden
    staging = steps["bandwidth"]["result"]["host_staging_copy"]  # the host's side is measured without a GPU too
    assert set(staging["gb_per_s"]) == {"1", "2", "4", "8"} and all(r > 0 for r in staging["gb_per_s"].values())
    assert all(row["passed"] for row in steps["parity"]["result"].values())
    rows = steps["throughput"]["result"]["rows"]
    assert rows["ort-cpu fp16 features"]["input_bytes_per_item"] * 2 == rows["ort-cpu fp32 features"]["input_bytes_per_item"]
    assert all(row["items_per_s"] > 0 and "fraction_of_limit" in row for row in rows.values())
    assert rows["ort-cpu fp32 features"]["staged_ahead"] is False
    assert rows["ort-cpu fp32 features"]["pipelined"] is False and rows["ort-cpu fp32 features"]["precision"] == "fp32"
    # the graphs' memory traffic per spot (the memory limit needs the GPU's bandwidth): the fp16 graph moves less
    traffic = {k: rows[f"ort-cpu {k} features"]["memory_bytes_per_item"] for k in ("fp32", "fp16")}
    assert 0 < traffic["fp16"] < traffic["fp32"]
    slides = steps["slides"]["result"]["xenium-slide"]["rows"]
    assert set(slides["ort-cpu (indexed, table in memory), batch 256"]["phases_s"]) == {"encoder", "table", "head"}
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "## parity (ok)" in markdown and "| visium-uni (quick) | ort-cpu fp32 features |" in markdown
    # which ratios come from alternated repeats (the whole-slide bench's) and which from rows timed in turn
    # every row's "x eager" is paired with the eager baseline timed before each of its repeats (alternated)
    assert "visium-uni (quick): x eager is against torch eager, 64 items per run" in markdown
    assert "not alternated" not in markdown
    paired = {name: row["ratio_to_eager"] for name, row in rows.items()}
    assert paired.pop("torch eager") is None and all(r > 0 for r in paired.values())


def _scratch(tmp_path, monkeypatch) -> Path:
    """An empty temporary folder for the supervisor (this process) and its children."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def _left(scratch: Path) -> list[str]:
    # onnxruntime keeps a session-id file (.ses) in the temporary folder; it is not the suite's
    return sorted(p.name for p in scratch.iterdir() if p.name != ".ses")


def test_a_spent_budget_skips_steps_and_keeps_what_was_done(tmp_path):
    suite = _suite()
    run = suite.Suite(tmp_path, budget=0.0, smoke=True)
    run.step("doctor", suite.doctor)
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["steps"]["doctor"] == {"status": "skipped", "reason": "time budget spent"}
    run.budget = 1e9
    run.step("broken", lambda: 1 / 0)
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["steps"]["broken"]["status"] == "failed" and "ZeroDivisionError" in saved["steps"]["broken"]["error"]


def test_a_step_that_runs_out_of_its_share_records_the_cases_it_skipped(tmp_path):
    suite = _suite()
    cases = suite.parity(True, tmp_path, until=0.0)  # a share already spent
    assert cases and all(case == suite.SPENT for case in cases.values())
    run = suite.Suite(tmp_path, budget=1e9, smoke=True)
    run.results["steps"]["throughput"] = {"status": "ok", "result": {"workload": "w", "rows": {"v": suite.SPENT}}}
    run.write()
    assert "| w | v | skipped: this step's share" in (tmp_path / "gpu_suite.md").read_text()


def _capture_error(kind: str) -> Exception:
    from deepspot.errors import ConfigError

    if kind == "refused":  # onnxruntime says up front that it cannot capture the graph
        return ConfigError("m.onnx: onnxruntime cannot capture it as a CUDA graph (x); run it without")
    # accepted, then failing while capturing, with the CUDA error of the run
    return RuntimeError("Error in execution: CUDA failure 900: operation not permitted when stream is capturing ; "
                        "expr=cudaStreamEndCapture(stream_, &graph);")  # fmt: skip


@pytest.mark.parametrize(("kind", "said"), [("refused", "capture it as a CUDA graph"), ("failed", "capturing")])
def test_a_parity_case_whose_cuda_graph_cannot_be_captured_runs_again_without(kind, said):
    suite = _suite()
    seen = []

    class Report:
        passed = True

        def to_dict(self):
            return {"outputs": [{"max_abs": 1e-7}]}

        def summary(self):
            return "ok"

    def check(options):
        seen.append(None if options is None else options.cuda_graph)
        if options is None:
            raise _capture_error(kind)
        return Report()

    row = suite._case(check, None)
    assert seen == [None, False] and row["passed"] is True and said in row["without CUDA graphs, because"]
    failed = suite._case(lambda options: 1 / 0, None)
    assert failed["passed"] is False and "ZeroDivisionError" in failed["error"]


def test_a_failing_throughput_row_is_recorded_and_the_others_go_on(tmp_path):
    suite = _suite()
    row = suite._row(lambda a, b: a / b, 1, 0)
    assert "ZeroDivisionError" in row["error"] and "traceback" in row
    assert suite._row(lambda a, b: {"items_per_s": a + b}, 1, 2) == {"items_per_s": 3}
    run = suite.Suite(tmp_path, budget=1e9, smoke=True)
    run.results["steps"]["throughput"] = {"status": "ok", "result": {"workload": "w", "rows": {"v": row}}}
    run.write()
    assert "| w | v | failed: ZeroDivisionError" in (tmp_path / "gpu_suite.md").read_text()


def test_a_rows_arithmetic_limit_counts_the_flops_its_runner_computes():
    """Eager PyTorch runs every Rho of the ensemble, the exported graph one folded Rho (`deepspot bench` counts them
    so): each row's arithmetic limit is the GEMM rate over its own FLOPs per item."""
    from deepspot.runtime import RunnerOptions
    from deepspot.runtime.bench import get_workload

    suite = _suite()
    w = get_workload("visium-uni").quick()
    model = w.build_model(0)
    inputs = w.inputs(8, 0)
    rates = {"fp32_tflops": 1.0}
    for graph, folded in (("eager", False), ("export", True)):
        row = suite._measure(model, "torch", RunnerOptions(torch_graph=graph), inputs, 8, True, rates, w, 8, None)
        assert row["arithmetic_limit_items_per_s"] == pytest.approx(1e12 / w.flops_per_item(folded=folded))


def test_the_whole_slide_rows_take_the_median_of_at_least_five_repeats(monkeypatch):
    """BENCHMARKS.md: a median of at least 5 timed repeats after warm-up (the smoke run on the CPU may take fewer)."""
    from types import SimpleNamespace

    from deepspot.runtime import slide_bench

    suite = _suite()
    calls = []

    def fake(w, backends, batch, repeats, warmup, n_items=None):
        calls.append((w.name, repeats, warmup))
        return SimpleNamespace(bus_gb_per_s=None, baseline="eager", results=[])

    monkeypatch.setattr(slide_bench, "run_slide_bench", fake)
    monkeypatch.setattr(suite, "cuda_available", lambda: (True, "stand-in"))
    suite.slides(False)
    assert calls and all(repeats >= 5 and warmup >= 1 for _, repeats, warmup in calls)


def _slide_report(backends, batch):
    from types import SimpleNamespace

    results = [SimpleNamespace(backend="torch-cuda (eager, per-item)", items_per_s=1.0, ratio_to_torch=1.0,
                               input_bytes_per_item=8, fraction_of_bus=None, phases_s={}, batch_size=batch or 1024)]
    results += [SimpleNamespace(backend=f"{b} (indexed, table on the device)", items_per_s=2.0, ratio_to_torch=2.0,
                                input_bytes_per_item=4, fraction_of_bus=None, phases_s={"encoder": 0.1},
                                batch_size=batch or 1024) for b in backends]  # fmt: skip
    return SimpleNamespace(bus_gb_per_s=None, baseline="torch-cuda (eager, per-item)", results=results)


def test_a_failing_slide_backend_loses_neither_the_others_row_nor_the_other_runs(monkeypatch):
    """ort-cuda failing beside torch-cuda: each runs again alone (torch-cuda's row is kept), and a failing run of one
    backend is a row, not the end of the step."""
    from deepspot.runtime import slide_bench

    suite = _suite()
    calls, saved = [], []

    def fake(w, backends, batch, repeats, warmup, options=None, n_items=None):
        calls.append((w.name, tuple(backends), batch))
        if "ort-cuda" in backends:
            raise RuntimeError("ort-cuda broke")
        return _slide_report(backends, batch)

    monkeypatch.setattr(slide_bench, "run_slide_bench", fake)
    monkeypatch.setattr(suite, "cuda_available", lambda: (True, "stand-in"))
    out = suite.slides(False, partial=saved.append)
    rows = out["xenium-slide"]["rows"]
    assert "ort-cuda broke" in rows["ort-cuda, torch-cuda, the workload's batch"]["error"]
    assert "ort-cuda broke" in rows["ort-cuda alone, the workload's batch"]["error"]
    assert rows["torch-cuda (indexed, table on the device), batch 1024"]["items_per_s"] == 2.0
    assert "ort-cuda broke" in rows["ort-cuda, batch 4096"]["error"]  # the second xenium run: a row, no raise
    assert "torch-cuda (indexed, table on the device), batch 1024" in out["visium-slide"]["rows"]
    assert ("visium-slide", ("torch-cuda",), None) in calls and len(saved) == 3  # written after each run


def test_a_slide_run_whose_cuda_graph_cannot_be_captured_runs_again_without(monkeypatch):
    from deepspot.runtime import slide_bench

    suite = _suite()
    seen = []

    def fake(w, backends, batch, repeats, warmup, options=None, n_items=None):
        seen.append(None if options is None else options.cuda_graph)
        if options is None:
            raise RuntimeError("CUDA failure 901: operation failed due to a previous error during capture")
        return _slide_report(backends, batch)

    monkeypatch.setattr(slide_bench, "run_slide_bench", fake)
    monkeypatch.setattr(suite, "cuda_available", lambda: (True, "stand-in"))
    rows = suite.slides(False)["xenium-slide"]["rows"]
    row = rows["ort-cuda (indexed, table on the device), batch 4096"]
    assert row["items_per_s"] == 2.0 and "during capture" in row["without CUDA graphs, because"]
    assert seen[:2] == [None, False]


def test_slide_runs_past_the_budget_are_skipped_and_a_cut_short_step_keeps_its_rows(tmp_path, monkeypatch):
    from deepspot.runtime import slide_bench

    suite = _suite()
    monkeypatch.setattr(slide_bench, "run_slide_bench", lambda *a, **k: _slide_report(["ort-cuda"], 4096))
    monkeypatch.setattr(suite, "cuda_available", lambda: (True, "stand-in"))
    out = suite.slides(False, until=0.0)
    assert all(row == suite.SPENT for table in out.values() for row in table["rows"].values())
    run = suite.Suite(tmp_path, budget=1e9, smoke=False)
    run.partial("slides")({"xenium-slide": {"items": 10, "rows": {"r": {"items_per_s": 5.0}}}})
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]["slides"]
    assert saved["status"] == "running" and saved["result"]["xenium-slide"]["rows"]["r"]["items_per_s"] == 5.0
    assert "| xenium-slide | r | 5 |" in (tmp_path / "gpu_suite.md").read_text()


def test_a_step_that_fails_after_recording_cases_keeps_them(tmp_path):
    suite = _suite()
    run = suite.Suite(tmp_path, budget=1e9, smoke=True)

    def step(partial):
        partial({"spot/spot torch fp32": {"passed": True, "max_abs": 1e-7}})
        raise MemoryError("out of host memory")

    run.step("parity", step, run.partial("parity"))
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]["parity"]
    assert saved["status"] == "failed" and saved["result"]["spot/spot torch fp32"]["passed"] is True
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "MemoryError: out of host memory" in markdown and "| spot/spot torch fp32 | True | 1e-07 |" in markdown


def test_a_table_that_cannot_be_written_does_not_stop_the_suite(tmp_path, monkeypatch):
    suite = _suite()
    monkeypatch.setattr(suite, "markdown", lambda results: 1 / 0)
    run = suite.Suite(tmp_path, budget=1e9, smoke=True)
    run.step("gemm", lambda: {"fp32_tflops": 1.0})
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]["gemm"]["status"] == "ok"
    assert "ZeroDivisionError" in (tmp_path / "gpu_suite.md").read_text()


# -- resuming in a fresh process after a crash or a sticky CUDA error ------------------------------------------------
STICKY = "CUDA error: an illegal memory access was encountered"


def test_sticky_cuda_errors_are_told_from_the_others():
    suite = _suite()
    sticky = [
        RuntimeError(STICKY),  # torch (torch.AcceleratorError is a RuntimeError)
        RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA error: misaligned address"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was encountered"),
        RuntimeError("CUDA error cudaErrorIllegalAddress:an illegal memory access was encountered"),
        RuntimeError("CUDA error cudaErrorLaunchFailure:unspecified launch failure"),
        "cudaMemcpyAsync failed: an illegal memory access was encountered (error 700)",  # deepspot's CudaError
        "cudaEventSynchronize failed: unspecified launch failure (error 719)",
    ]
    ordinary = [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA failure 900: operation not permitted when stream is capturing"),  # retried without graphs
        RuntimeError("CUDA failure 901: operation failed due to a previous error during capture"),
        "cudaMalloc failed: out of memory (error 2)",
        ZeroDivisionError("division by zero"),
    ]
    assert all(suite._poisons_cuda(e) for e in sticky)
    try:  # a clean-up failing after the sticky error: the error that arrives is another, raised while handling it
        try:
            raise RuntimeError(STICKY)
        finally:
            raise ValueError("the runner could not be closed")
    except ValueError as e:
        assert suite._poisons_cuda(e) and not suite._poisons_cuda(ValueError("the runner could not be closed"))
    assert not any(suite._poisons_cuda(e) for e in ordinary)


def test_a_sticky_cuda_error_in_a_case_or_row_ends_the_step_instead_of_failing_every_later_one(tmp_path):
    suite = _suite()

    def poisoned(*args):
        raise RuntimeError(STICKY)

    with pytest.raises(RuntimeError, match="illegal memory access"):
        suite._case(poisoned, None)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        suite._row(poisoned)
    run = suite.Suite(tmp_path, budget=1e9, smoke=True)

    def step(partial):
        partial({"case": {"passed": True}})
        poisoned()

    with pytest.raises(suite._Poisoned):
        run.step("parity", step, run.partial("parity"))
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]["parity"]
    assert saved["status"] == "failed" and STICKY in saved["error"] and saved["result"] == {"case": {"passed": True}}


def _fake_steps(monkeypatch, suite, calls, parity_error=None):
    """Stand-in steps (fast, in this process): each records its call; parity records a case, then raises."""

    def parity(smoke, work, until, partial):
        calls.append("parity")
        partial({"spot/spot torch fp32": {"passed": True, "max_abs": 0.0}})
        if parity_error is not None:
            raise parity_error
        return {"spot/spot torch fp32": {"passed": True, "max_abs": 0.0}}

    def throughput(smoke, work, bw, rates, until, partial):
        calls.append(("throughput", bw, rates, until - time.perf_counter() + time.time()))
        return {"workload": "w", "rows": {}}

    monkeypatch.setattr(suite, "doctor", lambda: calls.append("doctor") or {})
    monkeypatch.setattr(suite, "bandwidth", lambda smoke: calls.append("bandwidth") or {"pinned_gb_per_s": 50.0})
    monkeypatch.setattr(suite, "gemm", lambda smoke: calls.append("gemm") or {"fp32_tflops": 60.0})
    monkeypatch.setattr(suite, "parity", parity)
    monkeypatch.setattr(suite, "throughput", throughput)
    monkeypatch.setattr(suite, "slides", lambda smoke, until, partial: calls.append("slides") or {})


def _in_process_child(suite, children):
    """``run_steps`` in this process, as the child runs it; records the exit status of each "child"."""
    import argparse

    def run(args, started):
        children.append(suite.run_steps(argparse.Namespace(**{**vars(args), "started_at": started})))
        return children[-1]

    return run


def _args(tmp_path, budget=1e9):
    import argparse

    return argparse.Namespace(out=tmp_path, budget=budget, smoke=True, child=False, started_at=None)


def test_a_sticky_cuda_error_resumes_in_a_fresh_process_with_the_next_step(tmp_path, monkeypatch):
    """The child exits with POISONED; the next one takes the bandwidth and GEMM rates from the JSON (it does not run
    those steps again) and keeps the budget's shares from the suite's start."""
    suite = _suite()
    calls, children = [], []
    _fake_steps(monkeypatch, suite, calls, parity_error=RuntimeError(STICKY))
    t0 = time.time()
    assert suite.supervise(_args(tmp_path, budget=300.0), _in_process_child(suite, children)) == 1
    assert children == [suite.POISONED, 1]
    assert calls[:4] == ["doctor", "bandwidth", "gemm", "parity"] and calls[5] == "slides"
    _, bw, rates, until = calls[4]
    assert bw == {"pinned_gb_per_s": 50.0} and rates == {"fp32_tflops": 60.0}
    assert until == pytest.approx(t0 + 200.0, abs=1.0)  # the suite's start + 2/3 of the budget
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = results["steps"]
    assert steps["parity"]["status"] == "failed" and STICKY in steps["parity"]["error"]
    assert steps["parity"]["result"]["spot/spot torch fp32"]["passed"] is True
    assert [steps[s]["status"] for s in ("throughput", "slides")] == ["ok", "ok"]
    assert results["restarts"][0]["failed_step"] == "parity"
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "Restarted in a fresh process after: a sticky CUDA error in parity" in markdown


def test_the_child_exits_with_its_own_status_after_a_sticky_cuda_error(tmp_path):
    """A real child process (the test hook raises the sticky error in its first step): exit status 3, the step
    recorded, no later step started."""
    import os
    import subprocess
    import sys

    suite = _suite()
    env = {**os.environ, suite.FAULT: "doctor:poison"}
    work = tmp_path / "work"  # the supervisor's folder, which removes what a child ended by os._exit leaves
    work.mkdir()
    command = [sys.executable, str(SUITE), "--child", "--out", str(tmp_path), "--smoke",
               "--started-at", repr(time.time()), "--work-root", str(work)]  # fmt: skip
    assert subprocess.run(command, env=env, check=False).returncode == suite.POISONED
    steps = json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]
    assert list(steps) == ["doctor"] and steps["doctor"]["status"] == "failed" and "restart" in steps["doctor"]
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "doctor failed: RuntimeError: CUDA error: an illegal memory access" in markdown


def test_an_ordinary_failure_does_not_restart(tmp_path, monkeypatch):
    suite = _suite()
    calls, children = [], []
    _fake_steps(monkeypatch, suite, calls, parity_error=ValueError("tolerance"))
    assert suite.supervise(_args(tmp_path), _in_process_child(suite, children)) == 1
    assert children == [1]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert results["steps"]["parity"]["status"] == "failed" and "restarts" not in results
    assert results["steps"]["slides"]["status"] == "ok"


def test_restarts_are_bounded_and_stop_once_the_budget_is_spent(tmp_path):
    suite = _suite()
    children = []

    def dies(args, started):  # dies before it starts a step, every time
        children.append(-9)
        return -9

    assert suite.supervise(_args(tmp_path / "a"), dies) == 0
    assert len(children) == len(suite.STEPS) + 1
    steps = json.loads((tmp_path / "a" / "gpu_suite.json").read_text())["steps"]
    assert all(steps[s]["status"] == "skipped" and "no restart left" in steps[s]["reason"] for s in suite.STEPS)
    children.clear()

    def poisons(args, started):  # a sticky CUDA error in the first step, with the budget spent by then
        run = suite.Suite(args.out, args.budget, args.smoke, resume=True)
        with pytest.raises(suite._Poisoned):
            run.step("doctor", lambda: (_ for _ in ()).throw(RuntimeError(STICKY)))
        time.sleep(0.05)
        children.append(suite.POISONED)
        return suite.POISONED

    assert suite.supervise(_args(tmp_path / "b", budget=0.01), poisons) == 1
    assert children == [suite.POISONED]
    steps = json.loads((tmp_path / "b" / "gpu_suite.json").read_text())["steps"]
    assert steps["doctor"]["status"] == "failed"
    assert all(steps[s] == {"status": "skipped", "reason": "time budget spent"} for s in suite.STEPS[1:])


def test_a_child_killed_by_a_signal_mid_step_loses_neither_its_cases_nor_the_next_steps(tmp_path, monkeypatch):
    """A real child process, killed by SIGSEGV after parity recorded its first cases (the test hook)."""
    suite = _suite()
    monkeypatch.setenv(suite.FAULT, "parity:segv")
    scratch = _scratch(tmp_path, monkeypatch)
    assert suite.main(["--out", str(tmp_path), "--smoke"]) == 1
    assert _left(scratch) == []  # the killed child's folder too
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = results["steps"]
    assert steps["parity"]["status"] == "failed" and steps["parity"]["error"] == "the process died: signal 11 (SIGSEGV)"
    assert steps["parity"]["result"] and all(row["passed"] for row in steps["parity"]["result"].values())
    assert [steps[s]["status"] for s in ("doctor", "bandwidth", "gemm", "throughput", "slides")] == ["ok"] * 5
    assert [r["failed_step"] for r in results["restarts"]] == ["parity"]


def test_a_hung_child_is_killed_after_its_steps_share_and_the_next_steps_still_run(tmp_path, monkeypatch):
    """A real child process that hangs in parity after recording a case: killed once parity's share of the budget
    and the grace have passed, recorded with what it had, and a fresh child runs the rest. Without the watchdog only
    the runbook's outer ``timeout`` would have ended it, and every later step with it. (The children are stand-ins
    that write the suite's JSON as the real one does: timing the real steps against a tight share would fail on a
    loaded machine.)"""
    import sys

    suite = _suite()
    scratch = _scratch(tmp_path, monkeypatch)
    script = (
        "import json, sys, time\n"
        "path = sys.argv[1]\n"
        "results = json.load(open(path))\n"
        "steps = results['steps']\n"
        "if 'parity' not in steps:  # the first child: the short steps, then a hang in parity after one case\n"
        "    for name in ('doctor', 'bandwidth', 'gemm'):\n"
        "        steps[name] = {'status': 'ok', 'result': {}}\n"
        "    steps['parity'] = {'status': 'running', 'result': {'spot/spot ort-cpu fp32': {'passed': True}}}\n"
        "    json.dump(results, open(path, 'w'))\n"
        "    time.sleep(3600)\n"
        "for name in ('throughput', 'slides'):  # the second child resumes\n"
        "    steps[name] = {'status': 'ok', 'result': {}}\n"
        "json.dump(results, open(path, 'w'))\n"
    )
    children = []

    def command(args, started):
        children.append(args.work_root)
        return [sys.executable, "-c", script, str(args.out / "gpu_suite.json")]

    monkeypatch.setattr(suite, "_child_command", command)
    t0 = time.time()
    assert suite.main(["--out", str(tmp_path), "--smoke", "--budget", "3", "--hang-grace", "0.5"]) == 1
    assert time.time() - t0 < 30  # parity's share ends at 1 s: killed at 1.5 s, not after the hour
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = results["steps"]
    assert steps["parity"]["status"] == "failed" and steps["parity"]["error"].startswith("hung in parity: killed ")
    assert steps["parity"]["result"] == {"spot/spot ort-cpu fp32": {"passed": True}}
    assert [steps[s]["status"] for s in ("doctor", "bandwidth", "gemm", "throughput", "slides")] == ["ok"] * 5
    assert [r["failed_step"] for r in results["restarts"]] == ["parity"] and len(children) == 2
    assert "Restarted in a fresh process after: hung in parity" in (tmp_path / "gpu_suite.md").read_text()
    assert children[0] == children[1] and _left(scratch) == []  # the work folder, the supervisor's, is gone


def test_the_watchdog_takes_the_step_the_child_is_in_from_its_json(tmp_path):
    suite = _suite()
    assert [suite.step_deadline(s, 360.0) for s in suite.STEPS] == [120.0] * 4 + [240.0, 360.0]
    assert suite._current_step(tmp_path) == "slides"  # no JSON yet: only the whole budget bounds it
    run = suite.Suite(tmp_path, budget=360.0, smoke=True)
    run.results["steps"] = {"doctor": {"status": "ok"}, "bandwidth": {"status": "ok"}, "gemm": {"status": "failed"},
                            "parity": {"status": "ok"}, "throughput": {"status": "running"}}  # fmt: skip
    run.write()
    assert suite._current_step(tmp_path) == "throughput"


def test_the_table_says_why_steps_had_nothing_to_run_where_there_is_no_gpu(tmp_path):
    """The full suite (not --smoke) on a machine whose CUDA is missing: the steps record "skipped" with the reason
    instead of their tables, and the Markdown says so (it failed with AttributeError, leaving only the JSON)."""
    suite = _suite()
    reason = "torch.cuda.is_available() is False"
    results = {"date": "today", "smoke": False, "steps": {
        "parity": {"status": "ok", "result": {"spot/spot": {"skipped": reason}}},
        "throughput": {"status": "ok", "result": {"skipped": reason}},
        "slides": {"status": "ok", "result": {"skipped": reason}}}}  # fmt: skip
    text = suite.markdown(results)
    assert "## throughput (ok)\nskipped: " + reason in text and "## slides (ok)\nskipped: " + reason in text
    assert f"| spot/spot | {reason} |" in text


_SLOW_CHILD = """
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
steps = {"doctor": {"status": "ok"}, "bandwidth": {"status": "ok"}, "gemm": {"status": "ok"}}
t0 = time.time()
while time.time() - t0 < {seconds}:  # parity, past its share, recording a case every 0.3 s
    steps["parity"] = {"status": "running", "result": {"case": time.time()}}
    (out / "gpu_suite.json").write_text(json.dumps({"steps": steps}))
    time.sleep(0.3)
if {finish}:
    steps.update({name: {"status": "ok"} for name in ("parity", "throughput", "slides")})
    (out / "gpu_suite.json").write_text(json.dumps({"steps": steps}))
    sys.exit(0)
time.sleep(3600)  # hung, after its last record
"""


def _slow_child(suite, tmp_path, monkeypatch, seconds: float, finish: bool):
    """The supervisor's child is a script that records parity cases for ``seconds``, then ends or hangs."""
    import argparse
    import sys

    script = tmp_path / "child.py"
    script.write_text(_SLOW_CHILD.replace("{seconds}", str(seconds)).replace("{finish}", str(finish)))
    monkeypatch.setattr(suite, "_child_command", lambda args, started: [sys.executable, str(script), str(args.out)])
    out = tmp_path / "out"
    out.mkdir()
    return lambda budget: argparse.Namespace(out=out, budget=budget, smoke=True, hang_grace=1.0, work_root=None)


def test_a_slow_step_that_still_records_cases_is_not_killed_as_hung(tmp_path, monkeypatch):
    """Parity's share ends at 2 s and the grace is 1 s, but the child records a case every 0.3 s until 4.5 s: slow, not
    hung (a case started just before the share ended runs to its end). It was killed at 3 s, and the step recorded as
    failed ("hung in parity")."""
    suite = _suite()
    args = _slow_child(suite, tmp_path, monkeypatch, 4.5, True)
    rc = suite._run_child(args(6.0), time.time())
    assert rc == 0 and not isinstance(rc, suite.Hung)


def test_a_child_that_stops_recording_after_its_share_is_killed_a_grace_later(tmp_path, monkeypatch):
    suite = _suite()
    args = _slow_child(suite, tmp_path, monkeypatch, 3.0, False)
    started = time.time() - 18.0  # parity's share (a third of 60 s) ended 2 s ago
    rc = suite._run_child(args(60.0), started)
    took = time.time() - started - 18.0
    assert isinstance(rc, suite.Hung) and rc.why.startswith("hung in parity: killed 1 s after it last recorded")
    assert 3.5 < took < 10  # 1 s after its last record (about 3 s), not 1 s after its share ended
