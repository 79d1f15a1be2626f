"""The device pipeline's ring, tested on the CPU: slot reuse, order, padding, no row lost or duplicated when
batches finish out of order, clean shutdown on an error; and the CUDA library discovery and ``deepspot doctor``."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from deepspot.cli import app
from deepspot.errors import BackendUnavailableError
from deepspot.runtime import cuda_libs
from deepspot.runtime.backends import Probe, unavailable_reason
from deepspot.runtime.pipeline import DEFAULT_DEPTH, STAGED_DEPTH, HostAdapter, HostRing, run_pipeline

G = 3


def _compute(feed):
    x = feed["x"]
    return {"y": np.stack([x.sum(axis=(1, 2)), x.max(axis=(1, 2)), np.full(x.shape[0], x.shape[0], x.dtype)], 1)}


class Scrambled:
    """An asynchronous fake device: each batch finishes after a random delay, in any order; ``wait`` blocks on it."""

    def __init__(self, fail_at: int | None = None, seed: int = 0):
        self.rng = random.Random(seed)
        self.fail_at = fail_at
        self.submitted = 0
        self.seen_rows: list[int] = []

    def output_specs(self):
        return {"y": ((G,), np.dtype(np.float32))}

    def submit(self, slot):
        index = self.submitted
        self.submitted += 1
        self.seen_rows.append(slot.feed["x"].shape[0])
        feed = {k: v.copy() for k, v in slot.feed.items()}
        delay = self.rng.uniform(0, 0.01)

        def work():
            time.sleep(delay)
            if index == self.fail_at:
                raise RuntimeError("device error in batch %d" % index)
            slot.result["y"][...] = _compute(feed)["y"]

        errors: list[BaseException] = []

        def run():
            try:
                work()
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        return thread, errors

    def wait(self, handle):
        thread, errors = handle
        thread.join()
        if errors:
            raise errors[0]


def _inputs(n=103, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 2, 4)).astype(np.float32)}


def _collect(stream, n):
    out = np.full((n, G), np.nan, np.float32)
    writes = np.zeros(n, int)
    last = -1
    for start, stop, outputs in stream:
        assert start > last  # yielded in order of start
        last = start
        out[start:stop] = outputs["y"]
        writes[start:stop] += 1
    return out, writes


@pytest.mark.parametrize("batch_size, depth", [(10, 2), (7, 3), (200, 4), (1, 2)])
def test_rows_arrive_once_and_in_order_when_batches_finish_out_of_order(batch_size, depth):
    inputs = _inputs()
    out, writes = _collect(run_pipeline(inputs, Scrambled(), batch_size, depth=depth), 103)
    assert (writes == 1).all()  # no row lost, none duplicated
    expected = np.concatenate([_compute({"x": inputs["x"][i : i + batch_size]})["y"] for i in range(0, 103, batch_size)])
    np.testing.assert_array_equal(out, expected)


def test_the_ring_reuses_its_buffers():
    ring = HostRing(3, lambda shape, dtype: np.empty(shape, dtype))
    for _ in range(2):  # a second pass over new data allocates nothing
        out, writes = _collect(run_pipeline(_inputs(), Scrambled(), 10, ring=ring), 103)
        assert (writes == 1).all()
    assert ring.allocations == 3 * 2  # 3 slots x (one input + one output), the last short batch included


def test_fixed_batches_pad_the_last_batch_and_drop_the_padding():
    adapter = Scrambled()
    inputs = _inputs(n=25)
    seen = []
    original = adapter.submit

    def spy(slot):
        seen.append(slot.feed["x"].copy())
        return original(slot)

    adapter.submit = spy
    out, writes = _collect(run_pipeline(inputs, adapter, 10, fixed_batch=True), 25)
    assert adapter.seen_rows == [10, 10, 10]  # every batch the full size, as a CUDA graph needs
    assert (seen[-1][5:] == 0).all() and np.array_equal(seen[-1][:5], inputs["x"][20:])
    assert (writes == 1).all() and out.shape == (25, G)
    assert out[20, 2] == 10  # the graph saw 10 rows; only the 5 real ones came back


def _live_fill_threads():
    return [t for t in threading.enumerate() if t.name == "deepspot-pipeline-fill" and t.is_alive()]


def test_a_device_error_stops_everything_cleanly():
    with pytest.raises(RuntimeError, match="device error in batch 4"):
        _collect(run_pipeline(_inputs(), Scrambled(fail_at=4), 10, depth=3), 103)
    time.sleep(0.05)
    assert _live_fill_threads() == []


def test_a_reused_ring_serves_the_next_call_after_an_error():
    """An adapter's ring outlives a call: one that failed with batches in flight must not leave slots out."""
    ring = HostRing(3, lambda shape, dtype: np.empty(shape, dtype))
    with pytest.raises(RuntimeError, match="device error in batch 4"):
        _collect(run_pipeline(_inputs(), Scrambled(fail_at=4), 10, ring=ring), 103)
    assert ring._free.qsize() == 3  # else the next call would wait for a slot forever
    stream = run_pipeline(_inputs(), Scrambled(), 10, ring=ring)
    next(stream)
    stream.close()  # a consumer that stops early leaves slots out as well
    assert ring._free.qsize() == 3
    out, writes = _collect(run_pipeline(_inputs(), Scrambled(), 10, ring=ring), 103)
    assert (writes == 1).all()
    np.testing.assert_allclose(out[:, :2], _compute(_inputs())["y"][:, :2], rtol=1e-6)  # sums and maxima per row


def test_an_error_while_filling_is_raised_once_and_the_thread_ends():
    def prepare(start, stop, feed):
        if start >= 30:
            raise ValueError("bad rows")
        return feed

    with pytest.raises(ValueError, match="bad rows"):
        _collect(run_pipeline(_inputs(), Scrambled(), 10, prepare=prepare), 103)
    time.sleep(0.05)
    assert _live_fill_threads() == []


def test_stopping_waits_for_a_slow_fill_before_the_ring_serves_again():
    """A fill still running when the consumer stops must end before the ring is reset: else it would go on writing
    into a slot that the next call on the same ring already uses (a batch from a slow disk, here 5.5 s)."""
    ring = HostRing(3, lambda shape, dtype: np.empty(shape, dtype))
    entered = threading.Event()

    def slow(start, stop, feed):
        if start == 20:
            entered.set()
            time.sleep(5.5)
            return {k: np.full_like(v, 1e6) for k, v in feed.items()}
        return feed

    stream = run_pipeline(_inputs(), Scrambled(), 10, ring=ring, prepare=slow)
    next(stream)
    assert entered.wait(5)
    stream.close()
    assert _live_fill_threads() == []  # closed means the fill thread has ended, however long its batch took
    out, writes = _collect(run_pipeline(_inputs(), Scrambled(), 10, ring=ring), 103)
    assert (writes == 1).all()
    np.testing.assert_allclose(out[:, :2], _compute(_inputs())["y"][:, :2], rtol=1e-6)


def test_stopping_early_waits_for_batches_in_flight():
    adapter = Scrambled()
    stream = run_pipeline(_inputs(), adapter, 10, depth=4)
    next(stream)
    stream.close()
    time.sleep(0.05)
    assert _live_fill_threads() == []


class Blocking:
    """A fake device whose submit returns only once the batch computed (onnxruntime replaying a CUDA graph), with a
    ``stage`` that copies a slot's inputs "to the device" in a thread after a random delay (the copy stream).

    ``log``: ``("stage" | "submit" | "wait", batch)`` in call order. ``uploading``: batches staged whose copy nobody
    has consumed (submit) or waited for; ``pending``: batches submitted and not waited for. Both must be empty once a
    call has ended, however it ended.
    """

    submit_blocks = True

    def __init__(self, fail_stage_at=None, fail_submit_at=None, seed=0, batch_size=10):
        self.rng = random.Random(seed)
        self.fail_stage_at, self.fail_submit_at = fail_stage_at, fail_submit_at
        self.batch_size = batch_size
        self.log: list[tuple[str, int]] = []
        self.uploading: set[int] = set()
        self.pending: set[int] = set()
        self.seen: list[np.ndarray] = []
        self.slots: set[int] = set()
        self._device: dict[int, tuple[threading.Thread, dict]] = {}
        self.lock = threading.Lock()

    def output_specs(self):
        return {"y": ((G,), np.dtype(np.float32))}

    def _batch(self, slot):
        return slot.start // self.batch_size

    def stage(self, slot):
        i = self._batch(slot)
        self.log.append(("stage", i))
        if i == self.fail_stage_at:
            raise RuntimeError(f"copy error in batch {i}")
        self.slots.add(slot.index)
        copied: dict = {}
        delay = self.rng.uniform(0, 0.005)

        def upload():
            time.sleep(delay)  # the host buffer must stay untouched until this copy has read it
            copied.update({k: v.copy() for k, v in slot.feed.items()})

        thread = threading.Thread(target=upload)
        thread.start()
        self._device[slot.index] = (thread, copied)
        with self.lock:
            self.uploading.add(i)
        return ("staged", i, thread)

    def submit(self, slot):
        i = self._batch(slot)
        if slot.index not in self._device:
            self.stage(slot)
        self.log.append(("submit", i))
        thread, copied = self._device.pop(slot.index)
        if i == self.fail_submit_at:
            raise RuntimeError(f"device error in batch {i}")
        thread.join()  # the compute waits for the copy (on the device, here in the blocking submit)
        with self.lock:
            self.uploading.discard(i)
            self.pending.add(i)
        self.seen.append(copied["x"])
        slot.result["y"][...] = _compute(copied)["y"]
        return ("done", i, None)

    def wait(self, handle):
        kind, i, thread = handle
        self.log.append(("wait", i))
        if thread is not None:
            thread.join()
            self._device.pop(next((k for k, v in self._device.items() if v[0] is thread), None), None)
        with self.lock:
            (self.uploading if kind == "staged" else self.pending).discard(i)

    def order(self, kind):
        return {i: n for n, (k, i) in enumerate(self.log) if k == kind}


def _counting():
    allocations = []

    def allocate(shape, dtype):
        allocations.append(shape)
        return np.empty(shape, dtype)

    return allocations, allocate


def test_a_blocking_submit_gets_the_next_batch_staged_before_it():
    """Where submit blocks until the batch computed, the copy of batch i + 1 must be on its way before batch i is
    submitted (else copy and compute take turns), on a ring with one slot more: one filling, one staged, one
    computing, one draining."""
    inputs = _inputs()
    adapter = Blocking()
    allocations, allocate = _counting()
    out, writes = _collect(run_pipeline(inputs, adapter, 10, allocate=allocate), 103)
    assert (writes == 1).all()
    np.testing.assert_array_equal(out, np.concatenate([_compute({"x": inputs["x"][i : i + 10]})["y"]
                                                       for i in range(0, 103, 10)]))  # fmt: skip
    staged, submitted = adapter.order("stage"), adapter.order("submit")
    assert sorted(staged) == sorted(submitted) == list(range(11))
    assert all(staged[i + 1] < submitted[i] for i in range(10))
    assert len(allocations) == STAGED_DEPTH * 2 and adapter.slots == set(range(STAGED_DEPTH))  # x and y per slot
    assert adapter.uploading == adapter.pending == set()


def test_an_adapter_whose_submit_does_not_block_is_not_staged_ahead():
    adapter = Blocking()
    adapter.submit_blocks = False
    allocations, allocate = _counting()
    _, writes = _collect(run_pipeline(_inputs(), adapter, 10, allocate=allocate), 103)
    assert (writes == 1).all()
    assert [k for k, _ in adapter.log if k != "wait"] == ["stage", "submit"] * 11  # submit stages its own batch
    assert len(allocations) == DEFAULT_DEPTH * 2


def test_staging_ahead_pads_the_last_batch():
    inputs = _inputs(n=25)
    adapter = Blocking()
    out, writes = _collect(run_pipeline(inputs, adapter, 10, fixed_batch=True), 25)
    assert [x.shape[0] for x in adapter.seen] == [10, 10, 10]
    assert (adapter.seen[-1][5:] == 0).all() and np.array_equal(adapter.seen[-1][:5], inputs["x"][20:])
    assert (writes == 1).all() and out[20, 2] == 10
    staged, submitted = adapter.order("stage"), adapter.order("submit")
    assert staged[1] < submitted[0] and staged[2] < submitted[1]


@pytest.mark.parametrize("where", ["stage", "submit"])
def test_an_error_while_staging_ahead_is_raised_once_and_every_staged_copy_is_waited_for(where):
    ring = HostRing(STAGED_DEPTH, lambda shape, dtype: np.empty(shape, dtype))
    adapter = Blocking(**{f"fail_{where}_at": 4})
    stream = run_pipeline(_inputs(), adapter, 10, ring=ring)
    got = []
    with pytest.raises(RuntimeError, match="error in batch 4") as raised:
        for start, _, _ in stream:
            got.append(start)
    assert "copy" in str(raised.value) if where == "stage" else "device" in str(raised.value)
    assert got == [0, 10, 20][: len(got)] and len(got) >= 2
    assert list(stream) == []  # raised once: the generator has ended
    assert adapter.uploading == set() and adapter.pending == set()  # nothing left in flight into the buffers
    assert ("submit", 3) not in adapter.log[: adapter.log.index(("stage", 4))]  # batch 4 was staged ahead of it
    assert _live_fill_threads() == []
    assert ring._free.qsize() == STAGED_DEPTH
    again = Blocking()
    out, writes = _collect(run_pipeline(_inputs(), again, 10, ring=ring), 103)
    assert (writes == 1).all()
    np.testing.assert_allclose(out[:, :2], _compute(_inputs())["y"][:, :2], rtol=1e-6)
    assert again.uploading == again.pending == set()


def test_a_consumer_that_stops_while_batches_are_staged_leaves_nothing_in_flight():
    ring = HostRing(STAGED_DEPTH, lambda shape, dtype: np.empty(shape, dtype))
    adapter = Blocking()
    stream = run_pipeline(_inputs(), adapter, 10, ring=ring)
    assert [next(stream)[0], next(stream)[0]] == [0, 10]
    assert adapter.uploading  # the batch after the one computing is on its way
    stream.close()
    assert adapter.uploading == adapter.pending == set()
    assert _live_fill_threads() == [] and ring._free.qsize() == STAGED_DEPTH
    out, writes = _collect(run_pipeline(_inputs(), Blocking(), 10, ring=ring), 103)
    assert (writes == 1).all()


def test_predict_through_the_pipeline_equals_the_plain_loop(artifacts):
    from deepspot.runtime import load_runner
    from deepspot.runtime.stream import predict

    a = artifacts("spot", "subspot_neighbors")
    with load_runner(a.onnx, "ort-cpu") as runner:
        inputs = a.inputs()
        plain = predict(runner, inputs, 7, pipelined=False)
        piped = predict(runner, inputs, 7, pipelined=True)
        padded = predict(runner, inputs, 7, pipelined=True, fixed_batch=True)
    np.testing.assert_array_equal(piped, plain)
    np.testing.assert_allclose(padded, plain, rtol=0, atol=1e-6)  # other batch shapes: other GEMM blocking


def test_every_slot_is_allocated_before_the_first_batch_runs():
    """Page-locked allocation is forbidden in any thread while onnxruntime captures a CUDA graph, and it may capture
    on any early run: the prefetch thread allocates the whole ring before it hands out the first batch, and a ring
    reused by a second call allocates nothing."""
    allocations = []

    def allocate(shape, dtype):
        allocations.append(shape)
        return np.empty(shape, dtype)

    def slow_after_the_first(start, stop, feed):
        if start > 0:
            time.sleep(0.05)  # without the reservation the first submit would find one slot allocated
        return feed

    class Counting(HostAdapter):
        def submit(self, slot):
            seen.append(len(allocations))
            return super().submit(slot)

    seen: list[int] = []
    ring = HostRing(3, allocate)
    adapter = Counting(_compute, {"y": ((G,), np.dtype(np.float32))})
    for _ in range(2):
        _, writes = _collect(run_pipeline(_inputs(n=20), adapter, 4, ring=ring, prepare=slow_after_the_first), 20)
        assert (writes == 1).all()
    assert len(allocations) == 2 * 3 and set(seen) == {6}


def test_an_adapter_with_its_own_ring_keeps_it_across_calls():
    adapter = HostAdapter(_compute, {"y": ((G,), np.dtype(np.float32))})
    adapter.ring = HostRing(2, lambda shape, dtype: np.empty(shape, dtype))
    for n in (9, 7):
        _collect(run_pipeline(_inputs(n=n), adapter, 4), n)
    assert adapter.ring.allocations == 4  # x and y in each of its two slots, made by the first call only


def test_cpu_runners_have_no_device_pipeline(artifacts):
    from deepspot.runtime import load_runner

    with load_runner(artifacts("spot", "subspot_neighbors").onnx, "ort-cpu") as runner:
        assert runner.pipeline_adapter(16) is None


def test_host_adapter_runs_the_steps_in_place():
    adapter = HostAdapter(_compute, {"y": ((G,), np.dtype(np.float32))})
    out, writes = _collect(run_pipeline(_inputs(n=9), adapter, 4), 9)
    assert (writes == 1).all() and out[8, 2] == 1


# -- CUDA libraries --------------------------------------------------------------------------------------------------
def test_cuda_13_wheels_consolidated_folder_is_found(tmp_path, monkeypatch):
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublasLt.so.13").write_bytes(b"")
    (tmp_path / "nvidia" / "cudnn" / "lib").mkdir(parents=True)
    (tmp_path / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9").write_bytes(b"")
    monkeypatch.setattr(cuda_libs.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(cuda_libs.sys, "path", [])
    assert lib in cuda_libs.nvidia_library_dirs()
    assert cuda_libs.find_library("libcublasLt.so.*") == lib / "libcublasLt.so.13"
    assert cuda_libs.find_library("libcudnn.so.*").name == "libcudnn.so.9"


def test_the_wheels_libraries_load_before_preload_dlls_and_its_complaints_go_into_the_report(
    tmp_path, monkeypatch, capsys
):
    # onnxruntime-gpu in a --target folder misses the venv's nvidia wheels, and preload_dlls prints a line for each
    # library it cannot load (seen with onnxruntime-gpu 1.31.1 in a folder of its own beside torch 2.11's wheels).
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.13").write_bytes(b"")
    calls: list[str] = []

    def cdll(name, mode=0):
        calls.append(str(name))

    def preload_dlls(directory=None):
        calls.append("preload_dlls")
        print("Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file")

    fake = types.SimpleNamespace(preload_dlls=preload_dlls)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setattr(cuda_libs.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(cuda_libs.sys, "path", [])
    monkeypatch.setattr(cuda_libs.ctypes, "CDLL", cdll)
    cuda_libs.preload_cuda_libraries.cache_clear()
    try:
        report = cuda_libs.preload_cuda_libraries()
    finally:
        cuda_libs.preload_cuda_libraries.cache_clear()
    assert calls == [str(lib / "libcudart.so.13"), "preload_dlls"]
    assert report["libcudart.so.*"] == str(lib / "libcudart.so.13")
    assert report["onnxruntime.preload_dlls"].startswith("called; it said: Failed to load libcublasLt.so.13")
    assert capsys.readouterr().out == ""


def test_preloading_on_a_machine_without_cuda_reports_instead_of_failing():
    report = cuda_libs.preload_cuda_libraries()
    assert "libcudart.so.*" in report and all(isinstance(v, str) for v in report.values())


def _cuda_listed(monkeypatch, session) -> None:
    """onnxruntime-gpu as it looks without a usable GPU: CUDA listed, and ``session`` for the sessions it makes."""
    import onnxruntime

    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)


class _NoSession:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a session was made although the provider's library cannot load")


class _FellBack:
    def __init__(self, *args, **kwargs):
        pass

    def get_providers(self):
        return ["CPUExecutionProvider"]  # what onnxruntime does when the CUDA provider fails to load


def _gpu_checks(monkeypatch, library_error=None, device_error=None) -> list[int]:
    """What the checks before a session find: the provider's library error and the CUDA runtime's device error."""
    asked: list[int] = []
    monkeypatch.setattr(cuda_libs, "installed_provider_error", lambda provider: library_error)
    monkeypatch.setattr(cuda_libs, "cuda_device_error", lambda device_id: asked.append(device_id) or device_error)
    return asked


def test_a_provider_that_falls_back_to_the_cpu_is_an_error_naming_the_library(monkeypatch, artifacts):
    from deepspot.runtime import ort as ort_module

    model = artifacts("cell", "cell").onnx  # made before onnxruntime is faked below
    _cuda_listed(monkeypatch, _FellBack)
    _gpu_checks(monkeypatch)  # both pass; the session falls back all the same
    monkeypatch.setattr(cuda_libs, "provider_load_error", lambda p: "libcudnn.so.9: cannot open shared object file")
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider failed to load \(libcudnn\.so\.9: cannot "
                       r".*fell back to CPUExecutionProvider\. onnxruntime-gpu needs the CUDA"):
        ort_module.session_from_onnx(model, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(cuda_libs, "provider_load_error", lambda p: None)
    with pytest.raises(BackendUnavailableError, match=r"\(see onnxruntime's log above\).*check the NVIDIA driver"):
        ort_module.session_from_onnx(model, ["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize(
    "error, hint",
    [
        ("libcuda.so.1: cannot open shared object file (libcuda.so.1 comes with the NVIDIA driver: none is installed "
         "or visible here)", "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"),
        ("libcublasLt.so.13: cannot open shared object file",
         "pip install 'onnxruntime-gpu[cuda,cudnn]' nvidia-cublas"),
    ],
)  # fmt: skip
def test_a_provider_whose_library_cannot_load_is_refused_before_a_session(monkeypatch, artifacts, error, hint):
    from deepspot.runtime import ort as ort_module

    model = artifacts("cell", "cell").onnx  # made before onnxruntime is faked below
    _cuda_listed(monkeypatch, _NoSession)
    _gpu_checks(monkeypatch, library_error=error)
    with pytest.raises(BackendUnavailableError) as caught:
        ort_module.session_from_onnx(model, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    message = str(caught.value)
    assert message.startswith(f"CUDAExecutionProvider failed to load ({error}); ") and hint in message
    assert "deepspot[gpu]" not in message  # onnxruntime-gpu is installed: reinstalling it would not help


def test_a_gpu_the_cuda_runtime_cannot_use_is_refused_before_a_session(monkeypatch, artifacts):
    from deepspot.runtime import ort as ort_module

    model = artifacts("cell", "cell").onnx
    _cuda_listed(monkeypatch, _NoSession)
    asked = _gpu_checks(monkeypatch, device_error="cudaSetDevice failed: invalid device ordinal (error 101)")
    expected = r"^CUDAExecutionProvider cannot use GPU 3 \(cudaSetDevice failed: invalid device ordinal \(error 101\)\)"
    with pytest.raises(BackendUnavailableError, match=expected) as caught:
        ort_module.session_from_onnx(model, [("CUDAExecutionProvider", {"device_id": "3"}), "CPUExecutionProvider"])
    assert asked == [3]
    assert str(caught.value).endswith("); check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize(
    "count, code, device, expected",
    [
        (0, 35, 0,
         "cudaGetDeviceCount failed: CUDA driver version is insufficient for CUDA runtime version (error 35)"),
        (2, 0, 3, "there is no GPU 3: the CUDA runtime sees 2 with CUDA_VISIBLE_DEVICES='0,1'"),
        (4, 0, 3, None),
    ],
)  # fmt: skip
def test_cuda_device_error_asks_for_the_count_and_makes_no_context(monkeypatch, count, code, device, expected):
    class Cudart:
        cudaGetErrorString = staticmethod(lambda code: b"CUDA driver version is insufficient for CUDA runtime version")

        @staticmethod
        def cudaGetDeviceCount(ref):
            ref._obj.value = count
            return code

        def __getattr__(self, name):  # cudaSetDevice and the rest would make a context: not to be called
            raise AssertionError(f"{name} was called")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(cuda_libs, "load_cudart", lambda: (Cudart(), "libcudart.so"))
    assert cuda_libs.cuda_device_error(device) == expected


def test_cuda_device_error_names_a_runtime_that_does_not_load(monkeypatch):
    def missing():
        raise cuda_libs.CudaError("the CUDA runtime (libcudart) cannot be loaded: libcudart.so: cannot open")

    monkeypatch.setattr(cuda_libs, "load_cudart", missing)
    assert cuda_libs.cuda_device_error(0) == "the CUDA runtime (libcudart) cannot be loaded: libcudart.so: cannot open"


def test_provider_load_error_names_a_missing_provider(tmp_path, monkeypatch):
    # an onnxruntime without the CUDA provider's library (the CPU package)
    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(__file__=str(tmp_path / "__init__.py")))
    assert cuda_libs.provider_library("CUDAExecutionProvider") is None
    assert "not part of this onnxruntime build" in cuda_libs.provider_load_error("CUDAExecutionProvider")
    assert cuda_libs.provider_load_error("NoSuchExecutionProvider") == "NoSuchExecutionProvider is not part of this onnxruntime build"


class _FakeCudart:
    """libcudart and libcudnn as ``cuda_versions`` calls them, with the versions (and driver error) given."""

    def __init__(self, driver: int, code: int = 0):
        self.driver, self.code = driver, code
        self.cudaGetErrorString = lambda code: b"CUDA driver version is insufficient for CUDA runtime version"
        self.cudnnGetVersion = lambda: 91900

    def cudaRuntimeGetVersion(self, ref):
        ref._obj.value = 13000
        return 0

    def cudaDriverGetVersion(self, ref):
        ref._obj.value = self.driver
        return self.code


@pytest.mark.parametrize(
    "driver, code, expected",
    [(13010, 0, "13.1"), (0, 0, "none (no NVIDIA driver)"),
     (0, 35, "unknown (CUDA driver version is insufficient for CUDA runtime version (error 35))")],
)  # fmt: skip
def test_cuda_versions_need_no_gpu(monkeypatch, driver, code, expected):
    fake = _FakeCudart(driver, code)
    monkeypatch.setattr(cuda_libs, "preload_cuda_libraries", lambda: {})
    monkeypatch.setattr(cuda_libs, "find_library", lambda pattern: None)
    monkeypatch.setattr(cuda_libs.ctypes, "CDLL", lambda name, mode=0: fake)
    found = cuda_libs.cuda_versions()
    assert found == {"cuda runtime": "13.0 (libcudart.so)", "cuda driver api": expected, "cudnn": "9.19.0"}


def _recording_cudart(monkeypatch) -> list:
    """A libcudart whose every call succeeds and is recorded as ``(name, argument values)`` in the list returned."""
    calls = []

    class Cudart:
        def __getattr__(self, name):
            return lambda *args: calls.append((name, [getattr(a, "value", a) for a in args])) or 0

    monkeypatch.setattr(cuda_libs, "load_cudart", lambda: (Cudart(), "libcudart.so"))
    return calls


@pytest.mark.parametrize("kind", [cuda_libs.CudaRuntime.D2D, cuda_libs.CudaRuntime.H2D])
def test_a_synchronous_copy_waits_for_the_default_stream_it_ran_on(monkeypatch, kind):
    """cudaMemcpy returns before a device-to-device copy ends (and before a pageable copy's last DMA): the indexed
    layout's zero row, copied so into the table, could otherwise still be in flight when the head's graph reads it
    on a non-blocking stream (or when the encoder's next run overwrites the copy's source)."""
    calls = _recording_cudart(monkeypatch)
    cuda = cuda_libs.CudaRuntime(0)
    calls.clear()
    cuda.copy(4096, 8192, 64, kind)
    assert [name for name, _ in calls] == ["cudaMemcpy", "cudaStreamSynchronize"]
    assert calls[1][1] == [None]  # stream 0: the legacy default stream, on which cudaMemcpy runs


def test_every_thread_calls_the_cuda_runtime_on_the_runners_gpu(monkeypatch):
    """The runtime's current device is per thread: the prefetch thread, which allocates the ring's page-locked
    buffers, would otherwise make a context on GPU 0 (hundreds of MiB there) for a run on GPU 3."""
    import threading

    calls = _recording_cudart(monkeypatch)
    cuda = cuda_libs.CudaRuntime(3)
    cuda.stream()
    assert [name for name, _ in calls] == ["cudaSetDevice", "cudaStreamCreateWithFlags"] and calls[0][1] == [3]
    calls.clear()
    thread = threading.Thread(target=lambda: (cuda.host_alloc(64), cuda.host_alloc(64)))
    thread.start()
    thread.join()
    assert [name for name, _ in calls] == ["cudaSetDevice", "cudaHostAlloc", "cudaHostAlloc"] and calls[0][1] == [3]


def test_doctor_reports_the_cuda_libraries_where_a_gpu_provider_is_listed_without_a_gpu(monkeypatch):
    from deepspot.runtime import backends, doctor
    from deepspot.runtime._onnxruntime import ort_install

    listed = Probe(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), ort=ort_install())
    monkeypatch.setattr(backends.Probe, "detect", classmethod(lambda cls, **kwargs: listed))
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: {"name": None, "driver": None, "note": "no nvidia-smi"})
    monkeypatch.setattr(cuda_libs, "cuda_versions", lambda: {"cuda runtime": "13.0", "cudnn": "9.19.0"})
    monkeypatch.setattr(cuda_libs, "preload_cuda_libraries", lambda: {"libcudart.so.*": "/x/libcudart.so.13"})
    report = doctor.diagnose()
    assert report.libraries == {"cuda runtime": "13.0", "cudnn": "9.19.0", "libcudart.so.*": "/x/libcudart.so.13"}
    monkeypatch.setattr(backends.Probe, "detect", classmethod(lambda cls, **kwargs: Probe(ort=ort_install())))
    if doctor.diagnose().versions.get("torch cuda build") is None:  # a CPU build of PyTorch, and no GPU provider
        assert doctor.diagnose().libraries == {}


# -- deepspot doctor ---------------------------------------------------------------------------------------------------
def test_doctor_reports_every_backend_and_exits_0():
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["backends"]) == {"torch", "torch-cuda", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt"}
    assert report["backends"]["ort-cpu"]["available"] is True
    probe = Probe.detect()
    for name, row in report["backends"].items():  # what selection would say, GPU providers' load errors included
        why = unavailable_reason(name, probe)
        assert (row["available"], row["why not"]) == (why is None, why)
    assert report["backends"]["tensorrt"]["verified on a GPU"] is False
    assert report["versions"]["onnxruntime"] and report["versions"]["deepspot"]
    table = CliRunner().invoke(app, ["doctor"])
    assert table.exit_code == 0 and "unverified" in table.output
    if "CUDAExecutionProvider" not in probe.providers:  # the CPU package: the hint is to install the GPU one
        assert "onnxruntime-gpu" in report["backends"]["ort-cuda"]["why not"] and "deepspot[gpu]" in table.output


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-cuda", "ort-cuda"])
def test_the_gpu_pipeline_equals_the_plain_loop(artifacts, require, backend):
    require("cuda" if backend == "torch-cuda" else backend)
    from deepspot.runtime import load_runner
    from deepspot.runtime.stream import predict

    a = artifacts("spot", "subspot_neighbors")
    inputs = a.inputs()
    with load_runner(a.checkpoint if backend == "torch-cuda" else a.onnx, backend) as runner:
        assert runner.pipeline_adapter(8) is not None
        np.testing.assert_allclose(predict(runner, inputs, 8), predict(runner, inputs, 8, pipelined=False), atol=1e-5)


def test_a_held_slot_is_handed_out_again_only_once_released():
    """``hold``: the consumer keeps a batch's outputs while it writes them out elsewhere; the ring must not give that
    slot to a later batch meanwhile, whatever order the releases come in."""
    ring = HostRing(DEFAULT_DEPTH + 1, lambda shape, dtype: np.empty(shape, dtype))
    stream = run_pipeline(_inputs(), Blocking(), 10, ring=ring, hold=True)
    held, out = [], np.full((103, G), np.nan, np.float32)
    for start, stop, outputs, release in stream:
        held.append((start, stop, outputs, release))
        if len(held) == 2:  # release the newer first, then the older
            for start_, stop_, outputs_, release_ in reversed(held):
                out[start_:stop_] = outputs_["y"]  # still this batch's rows: no later batch wrote into the slot
                release_()
                release_()  # a second call does nothing (no slot twice in the ring)
            held.clear()
    for start_, stop_, outputs_, release_ in held:
        out[start_:stop_] = outputs_["y"]
        release_()
    inputs = _inputs()
    np.testing.assert_array_equal(out, np.concatenate([_compute({"x": inputs["x"][i : i + 10]})["y"]
                                                       for i in range(0, 103, 10)]))  # fmt: skip
    assert ring._free.qsize() == len(ring.slots)


def test_a_release_from_before_the_ring_was_reset_is_void():
    ring = HostRing(3, lambda shape, dtype: np.empty(shape, dtype))
    stream = run_pipeline(_inputs(), Scrambled(), 10, ring=ring, hold=True)
    *_, release = next(stream)
    stream.close()  # the consumer stops holding a batch: the ring is reset, every slot free
    release()  # too late: the slot must not go into the ring a second time
    assert ring._free.qsize() == 3


def _failing_writes(monkeypatch, stream, at: int, before=None) -> list:
    """``predict``'s writes fail at the ``at``-th (1-based) with a full disk, after ``before()``; the calls so far."""
    copy_rows, calls = stream.copy_rows, []

    def write(dst, src, threads=1, check_finite=False):
        calls.append(1)
        if len(calls) == at:
            if before is not None:
                before()
            raise OSError(28, "No space left on device")
        return copy_rows(dst, src, threads, check_finite=check_finite)

    monkeypatch.setattr(stream, "copy_rows", write)
    return calls


class _AdapterRunner:
    """The part of a runner that :func:`~deepspot.runtime.stream.predict` uses, with ``adapter`` as its device."""

    info = types.SimpleNamespace(output_size=G)

    def __init__(self, adapter):
        self.adapter = adapter

    def get_input_metadata(self):
        from deepspot.runtime.base import TensorSpec

        return {"x": TensorSpec("x", ("batch", 2, 4), np.dtype(np.float32))}

    def pipeline_adapter(self, batch_size):
        return self.adapter, None


def test_predict_writes_a_batch_out_while_the_next_one_computes(monkeypatch):
    """On ort-cuda with CUDA graphs a submit returns only once its batch computed, so the outputs of batch i must be
    written out (on another thread) while batch i + 1 computes, not between the two. Here the write of the first batch
    waits until a later batch has been submitted: written on the main thread between submits, it would wait forever
    (the test gives it 10 s)."""
    from deepspot.runtime import stream

    adapter = Blocking(batch_size=10)
    later_submitted = threading.Event()
    submit = adapter.submit

    def submit_and_tell(slot):
        handle = submit(slot)
        if slot.start >= 20:
            later_submitted.set()
        return handle

    adapter.submit = submit_and_tell
    overlapped = []
    copy_rows = stream.copy_rows

    def slow_copy(dst, src, threads=1, check_finite=False):
        if not overlapped:
            overlapped.append(later_submitted.wait(10))
        return copy_rows(dst, src, threads, check_finite=check_finite)

    monkeypatch.setattr(stream, "copy_rows", slow_copy)
    inputs = _inputs()
    got = stream.predict(_AdapterRunner(adapter), inputs, 10)
    assert overlapped == [True]
    np.testing.assert_array_equal(got, np.concatenate([_compute({"x": inputs["x"][i : i + 10]})["y"]
                                                       for i in range(0, 103, 10)]))  # fmt: skip
    assert adapter.uploading == adapter.pending == set()
    assert not [t for t in threading.enumerate() if t.name.startswith("deepspot-write")]


def test_an_error_in_a_write_stops_predict_and_the_ring_serves_again(monkeypatch):
    from deepspot.runtime import stream

    adapter = Blocking(batch_size=10)
    copy_rows = stream.copy_rows
    calls = _failing_writes(monkeypatch, stream, at=3)
    ring = HostRing(STAGED_DEPTH + 1, lambda shape, dtype: np.empty(shape, dtype))
    adapter.ring = ring
    with pytest.raises(OSError, match="No space left"):
        stream.predict(_AdapterRunner(adapter), _inputs(), 10)
    assert len(calls) < 11  # it stopped, not ran every batch first
    assert adapter.uploading == adapter.pending == set() and ring._free.qsize() == len(ring.slots)
    assert _live_fill_threads() == [] and not [t for t in threading.enumerate() if t.name.startswith("deepspot-write")]
    monkeypatch.setattr(stream, "copy_rows", copy_rows)
    inputs = _inputs()
    np.testing.assert_array_equal(stream.predict(_AdapterRunner(adapter), inputs, 10),
                                  np.concatenate([_compute({"x": inputs["x"][i : i + 10]})["y"]
                                                  for i in range(0, 103, 10)]))  # fmt: skip


class _SlowReleaseRing(HostRing):
    """A ring whose releases from another thread than the main one pause just before the slot goes back: the moment
    at which the main thread may be resetting the ring (the pipeline's generator ending while writes are pending)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pausing = threading.Event()

    def release(self, slot):
        if threading.current_thread() is not threading.main_thread():
            self.pausing.set()
            time.sleep(0.2)
        super().release(slot)


def test_a_release_racing_a_reset_puts_no_slot_in_the_ring_twice():
    ring = _SlowReleaseRing(3, lambda shape, dtype: np.empty(shape, dtype))
    stream = run_pipeline(_inputs(), Scrambled(), 10, ring=ring, hold=True)
    *_, release = next(stream)
    writer = threading.Thread(target=release)  # the writer thread, releasing its slot
    writer.start()
    assert ring.pausing.wait(5)
    stream.close()  # the ring is reset meanwhile: every slot free, this one included
    writer.join()
    assert ring._free.qsize() == 3  # a slot twice would be handed to two batches of the next call


def test_predict_leaves_every_slot_in_the_ring_once_when_writes_outlast_the_pipeline():
    """The pipeline's generator ends (and resets the ring) while the writer thread still writes the last batches
    out: their releases must not put a slot in the ring a second time, or the adapter's next call hands one slot to
    two batches and one batch's rows come out as another's."""
    from deepspot.runtime import stream

    ring = _SlowReleaseRing(DEFAULT_DEPTH + 1, lambda shape, dtype: np.empty(shape, dtype))
    adapter = HostAdapter(_compute, {"y": ((G,), np.dtype(np.float32))})
    adapter.ring = ring
    inputs = _inputs()
    expected = np.concatenate([_compute({"x": inputs["x"][i : i + 10]})["y"] for i in range(0, 103, 10)])
    np.testing.assert_array_equal(stream.predict(_AdapterRunner(adapter), inputs, 10), expected)
    assert ring._free.qsize() == len(ring.slots)


def test_an_interrupt_while_predict_waits_for_its_writes_still_ends_the_pipeline(monkeypatch):
    """A Ctrl-C that lands while predict waits for the pending writes (after a write failed, or a first Ctrl-C): the
    pipeline must still be closed (fill thread ended, device waited for, ring reset), not left to the garbage
    collector while the runner frees the buffers."""
    from deepspot.runtime import stream

    adapter = Blocking(batch_size=10)
    ring = HostRing(STAGED_DEPTH + 1, lambda shape, dtype: np.empty(shape, dtype))
    adapter.ring = ring
    _failing_writes(monkeypatch, stream, at=2)
    drain = stream._Writer.drain
    interrupted = []

    def interrupted_drain(self):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # the signal handler's exception, raised in the main thread
        return drain(self)

    monkeypatch.setattr(stream._Writer, "drain", interrupted_drain)
    with pytest.raises(KeyboardInterrupt) as caught:
        stream.predict(_AdapterRunner(adapter), _inputs(), 10)
    try:
        assert interrupted == [True]
        assert _live_fill_threads() == []
        assert adapter.uploading == adapter.pending == set() and ring._free.qsize() == len(ring.slots)
        assert not [t for t in threading.enumerate() if t.name.startswith("deepspot-write")]
    finally:
        del caught  # the traceback holds the pipeline's generator


def test_a_failed_write_of_an_earlier_batch_is_the_error_raised_over_a_later_batchs(monkeypatch):
    """The device fails on batch 5 while the write of batch 2 is still running and then fails too: the write's error
    (an earlier batch's) is the one raised, with the device's attached as its context."""
    from deepspot.runtime import stream

    adapter = Blocking(batch_size=10, fail_submit_at=5)
    submitted_5 = threading.Event()
    submit = adapter.submit

    def submit_and_tell(slot):
        if slot.start == 50:
            submitted_5.set()
        return submit(slot)

    adapter.submit = submit_and_tell
    _failing_writes(monkeypatch, stream, at=3, before=lambda: submitted_5.wait(10))  # batch 2, once batch 5 failed
    with pytest.raises(OSError, match="No space left") as raised:
        stream.predict(_AdapterRunner(adapter), _inputs(), 10)
    assert "device error in batch 5" in str(raised.value.__context__)
    assert _live_fill_threads() == [] and not [t for t in threading.enumerate() if t.name.startswith("deepspot-write")]
