"""Stand-ins that let the CPU run ``ort-cuda``'s device code with the semantics that matter on a GPU.

- :class:`HostCuda` has :class:`~deepspot.runtime.cuda_libs.CudaRuntime`'s calls, on host memory: copies happen at
  once (``memmove``), streams and events are numbers.
- :class:`AsyncHostCuda` defers each stream's work and runs it only when the host waits, in the order least
  favourable to the code under test: a stream later in ``priority`` runs first whenever nothing orders it after the
  others. A copy or a run that is not ordered by an event after the work it depends on then reads stale memory, as
  it could on a GPU.
- :class:`ReplaySession` wraps an onnxruntime CPU session and replays the way onnxruntime's CUDA provider does under
  CUDA graphs: per graph id (the ``gpu_graph_id`` run option, 0 when a run names none, -1 for no graph), the first run
  is a plain one, the second is captured, and every later run of that id replays on the buffers bound at capture,
  whatever the binding it is given. Code that binds new buffers to a captured graph gets stale results here, as it
  would on a GPU. A replay waits for its stream before returning, whatever the run options say, as onnxruntime's
  CUDA provider does (``cudaStreamSynchronize`` after ``cudaGraphLaunch`` in ``CUDAGraphManager::Replay``).
"""

from __future__ import annotations

import ctypes
import itertools
import random

import numpy as np

WARMUP_RUNS = 1  # plain runs of a graph id before onnxruntime captures it


class HostCuda:
    """The CUDA runtime calls of the pipeline, on host memory."""

    H2D, D2H, D2D = 1, 2, 3

    def __init__(self):
        self._ids = itertools.count(1)
        self.host: dict[int, np.ndarray] = {}
        self.device: dict[int, np.ndarray] = {}  # cudaMalloc's memory
        self.streams: set[int] = set()
        self.events: set[int] = set()
        self.allocations = 0
        self.copies = 0  # synchronous copies (cudaMemcpy)

    def host_alloc(self, nbytes: int) -> ctypes.c_void_p:
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        self.host[buf.ctypes.data] = buf
        self.allocations += 1
        return ctypes.c_void_p(buf.ctypes.data)

    def free_host(self, ptr: ctypes.c_void_p) -> None:
        del self.host[ptr.value]

    def malloc(self, nbytes: int) -> int:
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        self.device[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, ptr: int) -> None:
        del self.device[ptr]

    def stream(self) -> int:
        handle = next(self._ids)
        self.streams.add(handle)
        return handle

    def event(self) -> int:
        handle = next(self._ids)
        self.events.add(handle)
        return handle

    def destroy_stream(self, stream: int) -> None:
        self.streams.remove(stream)

    def destroy_event(self, event: int) -> None:
        self.events.remove(event)

    def copy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        ctypes.memmove(dst, src, nbytes)
        self.copies += 1

    def record(self, event: int, stream: int) -> None:
        assert event in self.events

    def wait_event(self, stream: int, event: int) -> None:
        assert event in self.events

    def synchronize(self, event: int) -> None:
        assert event in self.events

    def synchronize_stream(self, stream: int) -> None:
        assert stream in self.streams or stream == 0


class AsyncHostCuda(HostCuda):
    """Streams as queues of deferred work, run when the host synchronises on an event (see the module's text).

    ``priority``: streams in the order they are preferred when several could run; by default the most recently
    created first. With ``seed``, a random one of those that could run is taken each time instead. Work enqueued with
    :meth:`enqueue` (a session's run on its compute stream) is deferred the same way.
    """

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.rng = random.Random(seed) if seed is not None else None
        self.queues: dict[int, list] = {}
        self.priority: list[int] = []
        self._recorded: dict[int, int] = {}  # event -> generation of its latest record
        self._done: dict[int, int] = {}  # event -> latest generation that has run

    def stream(self) -> int:
        handle = super().stream()
        self.queues[handle] = []
        self.priority.insert(0, handle)
        return handle

    def copy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))

    def enqueue(self, stream: int, work) -> None:
        self.queues[stream].append(("work", work))

    def record(self, event: int, stream: int) -> None:
        super().record(event, stream)
        self._recorded[event] = self._recorded.get(event, 0) + 1
        self.queues[stream].append(("record", (event, self._recorded[event])))

    def wait_event(self, stream: int, event: int) -> None:
        super().wait_event(stream, event)
        self.queues[stream].append(("wait", (event, self._recorded.get(event, 0))))

    def synchronize(self, event: int) -> None:
        super().synchronize(event)
        self.drain(lambda: self._done.get(event, 0) >= self._recorded.get(event, 0))

    def free_host(self, ptr: ctypes.c_void_p) -> None:
        self.drain(lambda: not any(self.queues.values()))  # cudaFreeHost waits for the whole device
        super().free_host(ptr)

    def drain_stream(self, stream: int) -> None:
        """Run until ``stream`` is empty (what a synchronous call on that stream waits for)."""
        self.drain(lambda: not self.queues[stream])

    synchronize_stream = drain_stream

    def drain(self, until=lambda: False) -> None:
        while not until():
            order = self.priority if self.rng is None else self.rng.sample(self.priority, len(self.priority))
            for stream in order:
                queue = self.queues[stream]
                if not queue:
                    continue
                kind, item = queue[0]
                if kind == "wait" and self._done.get(item[0], 0) < item[1]:
                    continue  # blocked on an event not yet reached
                queue.pop(0)
                if kind == "work":
                    item()
                elif kind == "record":
                    self._done[item[0]] = max(self._done.get(item[0], 0), item[1])
                break
            else:
                if any(self.queues.values()):
                    raise AssertionError("deadlock: every stream waits for an event that is never recorded")
                if not until():
                    raise AssertionError("synchronised on an event that nothing will record")
                return


class ReplaySession:
    """An onnxruntime session that replays captured graphs as the CUDA provider does (see the module's text); with
    ``cuda_graphs=False`` it runs every binding as given, as a session without CUDA graphs does."""

    def __init__(self, session, cuda_graphs: bool = True):
        self._session = session
        self.cuda_graphs = cuda_graphs
        self.device: tuple[AsyncHostCuda, int] | None = None  # (stand-in, compute stream): runs go on that stream
        self.runs: dict[int, int] = {}
        self.captured: dict[int, object] = {}
        self.graph_ids: list[int] = []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run_with_iobinding(self, binding, run_options=None):
        try:
            graph_id = int(run_options.get_run_config_entry("gpu_graph_id"))
        except (AttributeError, RuntimeError):  # no run options, or none naming a graph: onnxruntime's default, 0
            graph_id = 0
        self.graph_ids.append(graph_id)
        replay = False
        if graph_id != -1 and self.cuda_graphs:
            if graph_id in self.captured:
                replay = True
                binding = self.captured[graph_id]  # a replay: the addresses of the capture, not the ones given
            elif self.runs.get(graph_id, 0) >= WARMUP_RUNS:
                self.captured[graph_id] = binding
            self.runs[graph_id] = self.runs.get(graph_id, 0) + 1
        if self.device is None:
            self._session.run_with_iobinding(binding, run_options)
            return
        cuda, stream = self.device
        cuda.enqueue(stream, lambda: self._session.run_with_iobinding(binding, run_options))
        try:
            asynchronous = run_options.get_run_config_entry("disable_synchronize_execution_providers") == "1"
        except (AttributeError, RuntimeError):
            asynchronous = False
        if replay or not asynchronous:  # onnxruntime waits for its stream before returning
            cuda.drain_stream(stream)
