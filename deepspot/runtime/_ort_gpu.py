"""IO binding for onnxruntime on a GPU: page-locked staging, device-resident outputs, CUDA graph replay.

Only imported by :class:`~deepspot.runtime.ort.OrtRunner` when it binds its inputs and outputs (the ``ort-cuda`` and
``ort-trt`` backends, and on ``ort-cpu`` the tests of this code).

A captured CUDA graph replays on the device addresses it was captured with: onnxruntime does not look at the binding
of a run that replays. So every graph here owns one fixed set of input and output buffers and one binding, made once
and never rebound, and every run of a session with CUDA graphs names its graph (``gpu_graph_id``), or ``-1`` to run
without one. :class:`CudaGraphs` keeps them per session; the plain runs (:class:`DeviceIO`) and the overlapping
pipeline (:class:`OrtCudaAdapter`) both go through it, across any number of calls.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ._cuda import PinnedPool, pinned_array
from ._onnxruntime import import_ort
from .base import TensorSpec
from .pipeline import HostRing, default_depth

GRAPH_ID = "gpu_graph_id"  # onnxruntime's run option: which CUDA graph a run captures or replays; -1 for none
MAX_GRAPHS = 4  # graphs per session; further shapes run without one (each graph keeps its buffers on the device)

Shapes = Mapping[str, tuple[tuple[int, ...], Any]]


@dataclass
class CudaGraph:
    """One captured graph: its id, its row count, and the fixed buffers and binding it replays on."""

    id: int
    rows: int
    signature: tuple
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    binding: Any = None


def signature(shapes: Shapes) -> tuple:
    """What a graph's buffers fix apart from the row count: each input's name, trailing dims and dtype."""
    return tuple(sorted((name, tuple(shape[1:]), np.dtype(dtype).str) for name, (shape, dtype) in shapes.items()))


class CudaGraphs:
    """The CUDA graphs of one onnxruntime session, one per input signature (names, trailing dims, dtypes).

    A feed runs on the smallest graph of its signature that has at least its rows (padded to them); a new signature
    gets a new graph of ``max(rows, rows_hint)`` rows, up to ``limit`` graphs. Beyond that it runs without a graph
    (``gpu_graph_id=-1``) where the provider supports graph ids (onnxruntime's CUDA provider); the TensorRT provider
    captures one graph only, so there ``limit`` is 1 and another signature is an error.

    Args:
        session: The ``InferenceSession`` (CUDA graphs enabled in its provider options).
        outputs: The graph's output specs (their sizes past the batch axis must be fixed).
        device_type: ``cuda`` (``cpu`` runs the same logic on the CPU provider: that is how it is tested).
        device_id: The GPU.
        rows_hint: Rows of a new graph at least (the runner's batch size), so that one graph serves a slide's short
            first call (the zero tile) and its full batches alike.
        annotated: Whether the provider takes ``gpu_graph_id`` (onnxruntime's CUDA provider does).
        constants: Inputs bound once for every graph and run (the indexed head's embedding table).
    """

    def __init__(self, session, outputs: dict[str, TensorSpec], device_type: str, device_id: int,
                 rows_hint: int | None = None, annotated: bool = True, constants: dict | None = None):  # fmt: skip
        self.ort = import_ort()
        self.session = session
        self.outputs = outputs
        self.device_type, self.device_id = device_type, device_id
        self.rows_hint = rows_hint or 0
        self.annotated = annotated
        self.limit = MAX_GRAPHS if annotated else 1
        self.constants = constants if constants is not None else {}
        self.graphs: list[CudaGraph] = []
        self._options: dict[tuple[int | None, bool], Any] = {}

    def run_options(self, graph_id: int | None, synchronize: bool = True):
        """Run options naming the graph (``None``: none named) and, with ``synchronize=False``, returning without
        waiting for the GPU (the pipeline waits on its own events)."""
        key = (graph_id, synchronize)
        if key not in self._options:
            options = self.ort.RunOptions()
            if graph_id is not None and self.annotated:
                options.add_run_config_entry(GRAPH_ID, str(graph_id))
            if not synchronize:
                options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._options[key] = options
        return self._options[key]

    def uncaptured(self, synchronize: bool = True):
        """Run options for a run without a graph, or an error where the provider cannot run one."""
        if not self.annotated:
            raise InputError(
                f"a CUDA graph was captured for {self.graphs[0].signature} x {self.graphs[0].rows} rows; this "
                "provider replays one graph only (rebuild the runner for other shapes, or turn CUDA graphs off)"
            )
        return self.run_options(-1, synchronize)

    def bind(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]):
        """A new IO binding of ``inputs``, ``outputs`` and the constants."""
        return bind(self.session, {**self.constants, **inputs}, outputs)

    def bind_constant(self, name: str, value) -> None:
        if self.graphs:
            raise RuntimeError(f"{name}: the captured CUDA graphs replay on the old buffer; build a new session")
        self.constants[name] = value

    def find(self, shapes: Shapes) -> CudaGraph | None:
        """The graph for a feed of ``shapes`` (made if there is room), or ``None``: run it without a graph."""
        rows = next(iter(shapes.values()))[0][0]
        sig = signature(shapes)
        fits = [g for g in self.graphs if g.signature == sig and g.rows >= rows]
        if fits:
            return min(fits, key=lambda g: g.rows)
        if len(self.graphs) >= self.limit:
            return None
        rows = max(rows, self.rows_hint)
        graph = CudaGraph(len(self.graphs) + 1, rows, sig)  # ids from 1: onnxruntime keeps 0 for itself
        for name, (shape, dtype) in shapes.items():
            zeros = np.zeros((rows,) + tuple(shape[1:]), dtype=dtype)  # padding rows start finite
            graph.inputs[name] = self.ort.OrtValue.ortvalue_from_numpy(zeros, self.device_type, self.device_id)
        for name, spec in self.outputs.items():
            if not all(isinstance(d, int) for d in spec.shape[1:]):
                raise InputError(f"a CUDA graph needs fixed output sizes; {name} has shape {spec.shape}")
            shape = (rows,) + tuple(spec.shape[1:])
            graph.outputs[name] = self.ort.OrtValue.ortvalue_from_shape_and_type(
                shape, np.dtype(spec.dtype), self.device_type, self.device_id
            )
        graph.binding = self.bind(graph.inputs, graph.outputs)
        self.graphs.append(graph)
        return graph


def bind(session, inputs: Mapping[str, Any], outputs: Mapping[str, Any]):
    """A new IO binding of a session to device ``OrtValue``s."""
    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name, value in outputs.items():
        binding.bind_ortvalue_output(name, value)
    return binding


def feed_shapes(feed: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {name: (a.shape, a.dtype) for name, a in feed.items()}


class DeviceIO:
    """Binds a session's inputs and outputs to GPU memory and runs it with ``run_with_iobinding``.

    Args:
        session: An ``InferenceSession`` on the CUDA or TensorRT provider.
        inputs: The graph's input specs.
        outputs: The graph's output specs.
        device_id: The GPU.
        cuda_graph: The session captures CUDA graphs: runs go through :class:`CudaGraphs` (fixed buffers, shorter
            batches zero-padded).
        device_type: ``cuda``; ``cpu`` runs the same binding logic on the CPU provider (that is how it is tested on
            machines without a GPU).
        rows_hint: Rows of a new CUDA graph at least (the runner's batch size).
        annotated: Whether the provider takes graph ids (see :class:`CudaGraphs`).
        cuda: The CUDA runtime, for page-locked staging without PyTorch (:class:`~deepspot.runtime._cuda.PinnedPool`).
    """

    def __init__(self, session, inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec], device_id: int,
                 cuda_graph: bool, device_type: str = "cuda", rows_hint: int | None = None,
                 annotated: bool = True, cuda=None):  # fmt: skip
        self.ort = import_ort()
        self.session = session
        self.inputs, self.outputs = inputs, outputs
        self.device_id = device_id
        self.device_type = device_type
        self.constants: dict[str, Any] = {}
        self.constants_version = 0  # bumped when a constant changes: bindings made before are stale
        self.binding = session.io_binding()  # the runs without a graph
        self.pinned = PinnedPool(cuda)
        self.graphs = (
            CudaGraphs(session, outputs, device_type, device_id, rows_hint, annotated, self.constants)
            if cuda_graph
            else None
        )

    def close(self) -> None:
        """Free the page-locked staging buffers."""
        self.pinned.close()

    def bind_constant(self, name: str, value) -> None:
        """Bind ``value`` (a device ``OrtValue``) as input ``name`` of every run; before the first run only, when
        the session captures CUDA graphs."""
        if self.graphs is not None:
            self.graphs.bind_constant(name, value)
        self.constants[name] = value
        self.constants_version += 1
        self.binding.bind_ortvalue_input(name, value)

    def _device_value(self, host: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id)

    def run(self, feed: dict[str, np.ndarray], to_host: bool = True) -> dict:
        n = next(iter(feed.values())).shape[0]
        graph = self.graphs.find(feed_shapes(feed)) if self.graphs is not None else None
        if graph is not None:
            for name, a in feed.items():  # same addresses: the graph stays valid
                graph.inputs[name].update_inplace(self.pinned.stage(name, a, rows=graph.rows))
            self.session.run_with_iobinding(graph.binding, self.graphs.run_options(graph.id))
            values = [graph.outputs[name] for name in self.outputs]
        else:
            options = self.graphs.uncaptured() if self.graphs is not None else None
            for name, a in feed.items():
                self.binding.bind_ortvalue_input(name, self._device_value(self.pinned.stage(name, a)))
            for name in self.outputs:
                self.binding.bind_output(name, self.device_type, self.device_id)
            self.session.run_with_iobinding(self.binding, options)
            values = self.binding.get_outputs()
        if not to_host:
            return dict(zip(self.outputs, values))
        # Only the real rows, and always a copy: a graph's buffers are overwritten by its next run.
        return {name: np.array(v.numpy()[:n], dtype=np.float32) for name, v in zip(self.outputs, values)}

    def run_resident(self, feed: dict[str, np.ndarray], repeats: int) -> float:
        """Seconds for ``repeats`` runs on ``feed`` copied to the device once: the graph alone, without the host
        transfers (what bounds a pipeline that hides them). Each run waits for the device, as a plain run does."""
        self.run(feed, to_host=False)  # warm-up; with CUDA graphs this run and the next capture
        graph = self.graphs.find(feed_shapes(feed)) if self.graphs is not None else None
        if graph is not None:
            binding, options = graph.binding, self.graphs.run_options(graph.id)
        else:
            options = self.graphs.uncaptured() if self.graphs is not None else None
            inputs = {name: self._device_value(np.ascontiguousarray(a)) for name, a in feed.items()}
            binding = bind(self.session, {**self.constants, **inputs}, {})
            for name in self.outputs:  # allocated by onnxruntime on the device, reused while the shape stays
                binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding, options)
        start = time.perf_counter()
        for _ in range(repeats):
            self.session.run_with_iobinding(binding, options)
        return time.perf_counter() - start


class OrtCudaAdapter:
    """The ``ort-cuda`` side of :func:`~deepspot.runtime.pipeline.run_pipeline`, with the CUDA runtime through
    ``ctypes`` (no PyTorch).

    Each ring slot has device buffers; its host-to-device copy runs on an upload stream, onnxruntime runs on the
    session's compute stream (``user_compute_stream``) after an event, and the copy back into the slot's page-locked
    output buffer runs on a download stream. With CUDA graphs, each batch is copied on the device into its graph's
    fixed buffers and out of them (:class:`CudaGraphs`, shared with the runner's plain runs).

    One adapter serves every call while its runner is active: the ring of page-locked buffers (:attr:`ring`), the
    device buffers, streams and events are made once and freed by :meth:`close`.

    With :attr:`sink` set (``slot -> device address``), the graph's one output goes there on the device instead of
    back to the host: the indexed layout's encoder writes each batch into the slide's table this way.

    With CUDA graphs, :meth:`submit` returns only once the batch has computed: onnxruntime's CUDA provider
    synchronizes its stream after every graph replay (``cudaStreamSynchronize`` in ``CUDAGraphManager::Replay``),
    whatever ``disable_synchronize_execution_providers`` says. :attr:`submit_blocks` says so, and the pipeline then
    calls :meth:`stage` for the next batch (its copy to the device) before it submits this one, on a ring of
    :data:`~deepspot.runtime.pipeline.STAGED_DEPTH` slots (and one more for the batch whose outputs are being written
    out meanwhile).

    Args:
        runner: The active :class:`~deepspot.runtime.ort.OrtRunner` (with IO binding).
        cuda: The CUDA runtime (:class:`~deepspot.runtime.cuda_libs.CudaRuntime`).
        compute_stream: The session's compute stream.

    Ran on an NVIDIA H200 with onnxruntime-gpu 1.31.1 (the GPU suite, 2026-11-29: ``benchmarks/results/``).
    """

    def __init__(self, runner, cuda, compute_stream: int):
        self.ort = import_ort()
        self.runner = runner
        self.io: DeviceIO = runner._io
        self.cuda = cuda
        self.compute = compute_stream
        self.device_type = runner.device_type  # cpu: ort-cpu with a host stand-in for cuda, as the tests run it
        self.upload, self.download = cuda.stream(), cuda.stream()
        self._pinned: list = []
        # A graph replay returns once the device has run it (onnxruntime synchronizes after it): stage ahead.
        self.submit_blocks = self.io.graphs is not None
        # sized for predict, which holds each batch's slot while another thread writes its outputs out
        self.ring = HostRing(default_depth(self, hold=True), pinned_allocator(cuda, self._pinned))
        self._slots: dict[int, dict] = {}
        self.sink = None  # slot -> device address of its rows, for an output that stays on the device
        # run_with_iobinding would otherwise wait for the GPU before returning; the events do the waiting.
        self.no_sync = self.ort.RunOptions()
        self.no_sync.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def output_specs(self):
        g = self.runner.info.output_size
        return {
            name: (tuple(spec.shape[1:]) if all(isinstance(d, int) for d in spec.shape[1:]) else (g,),
                   np.dtype(spec.dtype))  # fmt: skip
            for name, spec in self.runner._outputs.items()
        }

    def _device(self, shape, dtype):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type, self.runner.device_id)

    def _buffers(self, slot) -> dict:
        shapes = {k: (v.shape, v.dtype) for k, v in {**slot.feed, **slot.result}.items()}
        state = self._slots.get(slot.index)
        if state is None or state["shapes"] != shapes:  # a slot's buffers are reused while its shapes stay
            events = state["events"] if state else [self.cuda.event() for _ in range(3)]
            state = {
                "shapes": shapes,
                "in": {k: self._device(a.shape, a.dtype) for k, a in slot.feed.items()},
                "out": {k: self._device(a.shape, a.dtype) for k, a in slot.result.items()},
                "events": events,
                "binding": None,  # made when the slot runs without a graph
                "constants": None,  # the constants' version it was made with
                "staged": None,  # the feed whose copy to the device is enqueued and not yet submitted
            }
            self._slots[slot.index] = state
        return state

    def stage(self, slot):
        """Enqueue the copy of ``slot``'s inputs to its device buffers on the upload stream, without waiting; return
        the event recorded after it (:meth:`wait` takes it). :meth:`submit` then does the rest."""
        cuda = self.cuda
        state = self._buffers(slot)
        uploaded = state["events"][0]
        try:
            for name, host in slot.feed.items():
                cuda.copy_async(state["in"][name].data_ptr(), host.ctypes.data, host.nbytes, cuda.H2D, self.upload)
            cuda.record(uploaded, self.upload)
        except BaseException:  # nothing left in flight: the copies enqueued before the failure are waited for
            try:
                cuda.record(uploaded, self.upload)
                cuda.synchronize(uploaded)
            except Exception:  # noqa: BLE001  the first error is the one raised
                pass
            raise
        state["staged"] = slot.feed  # this batch's feed (a new dict each fill): a stale mark never skips a copy
        return uploaded

    def submit(self, slot):
        try:
            return self._submit(slot)
        except BaseException:
            # What was enqueued before the failure may still read or write this slot's buffers, and the ring hands
            # them out again after the error: let the streams finish first (after a sticky CUDA error this fails too).
            for stream in (self.upload, self.compute, self.download):
                with contextlib.suppress(Exception):
                    self.cuda.synchronize_stream(stream)
            raise

    def _submit(self, slot):
        cuda, graphs = self.cuda, self.io.graphs
        state = self._buffers(slot)
        if state["staged"] is not slot.feed:  # not staged ahead (the pipeline stages only where submit blocks)
            self.stage(slot)
        state["staged"] = None
        uploaded, computed, done = state["events"]
        cuda.wait_event(self.compute, uploaded)  # on the device: the host does not wait for the copy
        graph = graphs.find(feed_shapes(slot.feed)) if graphs is not None else None
        if graph is not None:  # into the graph's buffers, run, and out of them: all in order on the compute stream
            for name, value in state["in"].items():
                dst = graph.inputs[name].data_ptr()
                cuda.copy_async(dst, value.data_ptr(), slot.feed[name].nbytes, cuda.D2D, self.compute)
            self.runner.session.run_with_iobinding(graph.binding, graphs.run_options(graph.id, synchronize=False))
            for name, value in state["out"].items():
                src = graph.outputs[name].data_ptr()
                cuda.copy_async(value.data_ptr(), src, slot.result[name].nbytes, cuda.D2D, self.compute)
        else:
            options = graphs.uncaptured(False) if graphs is not None else self.no_sync
            if state["binding"] is None or state["constants"] != self.io.constants_version:  # a new slide's table
                state["binding"] = bind(self.runner.session, {**self.io.constants, **state["in"]}, state["out"])
                state["constants"] = self.io.constants_version
            self.runner.session.run_with_iobinding(state["binding"], options)
        cuda.record(computed, self.compute)
        cuda.wait_event(self.download, computed)
        if self.sink is not None:  # the real rows, to where the next graph reads them
            (name, host), = slot.result.items()
            nbytes = slot.rows * host[0].nbytes
            cuda.copy_async(self.sink(slot), state["out"][name].data_ptr(), nbytes, cuda.D2D, self.download)
        else:
            for name, host in slot.result.items():
                cuda.copy_async(host.ctypes.data, state["out"][name].data_ptr(), host.nbytes, cuda.D2H, self.download)
        cuda.record(done, self.download)
        return done

    def wait(self, handle) -> None:
        self.cuda.synchronize(handle)

    def close(self) -> None:
        """Free the page-locked buffers, streams and events (no batch may be in flight). Each is freed even where
        another fails (after a CUDA error every call fails); the first error is raised at the end."""
        calls = [(self.cuda.destroy_event, event) for state in self._slots.values() for event in state["events"]]
        calls += [(self.cuda.destroy_stream, stream) for stream in (self.upload, self.download)]
        calls += [(self.cuda.free_host, ptr) for ptr in self._pinned]
        self._slots, self._pinned = {}, []
        first = None
        for free, handle in calls:
            try:
                free(handle)
            except Exception as e:  # noqa: BLE001  raised below, once the rest is freed
                first = first or e
        if first is not None:
            raise first


def pinned_allocator(cuda, keep: list):
    """Page-locked host buffers from ``cudaHostAlloc`` as NumPy arrays; ``keep`` holds the pointers to free."""
    return lambda shape, dtype: pinned_array(cuda, tuple(shape), dtype, keep)
