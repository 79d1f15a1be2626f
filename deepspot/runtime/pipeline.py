"""A device pipeline: page-locked host ring, copies on their own stream, compute and copies overlapping.

On a GPU the data path of one batch is: read the bundle's rows (prefetch thread) -> page-locked host buffer ->
host-to-device copy -> compute -> device-to-host copy into a page-locked buffer -> write into the output file. Done
one after the other, the copies and the compute take turns and the bus idles half the time. Here they overlap:

- the prefetch thread fills slot ``i + 1`` of a small ring of page-locked buffers (reused, never reallocated) while
  batch ``i`` is in flight;
- the host-to-device copy of a slot runs on a copy stream and records an event; the compute waits for that event on
  the compute stream (not on the host), and its outputs are copied back asynchronously into the slot's page-locked
  output buffer;
- the host waits only for the oldest batch in flight, writes its rows out and hands its slot back to the prefetch
  thread;
- where the adapter's ``submit`` blocks until the compute is done (:attr:`DeviceAdapter.submit_blocks`: onnxruntime's
  CUDA provider synchronizes its stream after every CUDA graph replay, whatever the run options say), the copy of
  batch ``i + 1`` would only be enqueued after batch ``i`` computed, and the two would take turns again. So the
  pipeline *stages ahead*: it enqueues the copy of batch ``i + 1`` (:meth:`DeviceAdapter.stage`) before it submits
  batch ``i``, and the ring has one slot more (:data:`STAGED_DEPTH`: one filling, one staged, one computing, one
  draining). An adapter whose submit does not block runs as before (no batch held back). For the same reason the
  consumer may *hold* a batch (``hold``): :func:`~deepspot.runtime.stream.predict` writes each batch's outputs out on
  a thread of its own while the next batch is submitted, and releases the slot when done (one slot more).

The ring logic is backend-neutral: a :class:`DeviceAdapter` does the device work (``torch-cuda`` with torch streams,
``ort-cuda`` with the CUDA runtime and IO binding), and :class:`HostAdapter` does the same steps synchronously on the
host, which is how the ordering, padding, slot reuse and shutdown are tested on machines without a GPU. Fixed-size
batches (for CUDA graph replay) pad the last short batch with zeros and drop the padded rows from the outputs.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from ._copy import copy_rows, default_copy_threads

Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]
DEFAULT_DEPTH = 3  # ring slots: one being filled, two in flight
STAGED_DEPTH = 4  # ring slots when staging ahead: one being filled, one staged, one computing, one draining
HELD_DEPTH = 1  # one slot more where the consumer holds a batch while it writes it out (``hold``)


def stages_ahead(adapter) -> bool:
    """Whether :func:`run_pipeline` stages batch ``i + 1`` before it submits batch ``i``: where the adapter's submit
    blocks until the compute is done and the adapter can stage a batch on its own."""
    return bool(getattr(adapter, "submit_blocks", False)) and callable(getattr(adapter, "stage", None))


def default_depth(adapter, hold: bool = False) -> int:
    """The ring's slots for ``adapter``: one more where the pipeline stages ahead, and one more where the consumer
    holds each batch while it writes it out (:func:`run_pipeline`'s ``hold``)."""
    return (STAGED_DEPTH if stages_ahead(adapter) else DEFAULT_DEPTH) + (HELD_DEPTH if hold else 0)


@dataclass
class Slot:
    """One ring entry: page-locked input and output buffers sized for a full batch, and what is in them now."""

    index: int
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    start: int = 0
    stop: int = 0
    feed: dict[str, np.ndarray] = field(default_factory=dict)  # this batch's views of ``inputs`` (padded rows)
    result: dict[str, np.ndarray] = field(default_factory=dict)  # this batch's views of ``outputs``
    handle: Any = None  # the adapter's record of the batch in flight (device buffers, events)

    @property
    def rows(self) -> int:
        return self.stop - self.start


class HostRing:
    """``depth`` slots of host buffers from ``allocate`` (page-locked on a GPU), handed out and returned in turn."""

    def __init__(self, depth: int, allocate: Allocate):
        if depth < 2:
            raise ConfigError(f"a pipeline needs at least 2 slots to overlap, got {depth}")
        self.allocate = allocate
        self.slots = [Slot(i) for i in range(depth)]
        self._free: queue.Queue[Slot] = queue.Queue()
        for slot in self.slots:
            self._free.put(slot)
        self._generation = 0  # counts resets: a release from before one is void
        self._lock = threading.Lock()  # a held batch's release (another thread) against a reset (the pipeline's end)
        self.allocations = 0  # buffers allocated so far: stays at (inputs + outputs) x depth once warm

    def acquire(self, stop: threading.Event) -> Slot | None:
        while not stop.is_set():
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def release(self, slot: Slot) -> None:
        slot.handle = None
        self._free.put(slot)

    def releaser(self, slot: Slot) -> Callable[[], None]:
        """A call that releases ``slot`` once; it does nothing after :meth:`reset` (which freed the slot already)."""
        generation, released = self._generation, []

        def release() -> None:
            # Checked and done under the lock: a reset between the check and the release would put the slot in the
            # ring twice (and the next call on this ring would hand it to two batches).
            with self._lock:
                if not released and self._generation == generation:
                    released.append(True)
                    self.release(slot)

        return release

    def reset(self) -> None:
        """Every slot free again: a call that ended early (an error, a consumer that stopped) leaves slots out."""
        with self._lock:
            self._generation += 1
            self._free = queue.Queue()
            for slot in self.slots:
                self.release(slot)

    def buffer(self, store: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The slot's buffer ``name`` with ``shape``, allocated once and reused (grown only if a batch is larger)."""
        size = int(np.prod(shape))
        buf = store.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = store[name] = self.allocate((size,), np.dtype(dtype)).reshape(-1)
            self.allocations += 1
        return buf[:size].reshape(shape)

    def reserve(self, like: Slot) -> None:
        """Give every slot the buffers of ``like``'s batch now, so that none is allocated while batches run.

        Page-locked allocation is one of the calls a CUDA graph capture forbids in any thread, and onnxruntime may
        capture on any of the first runs: the prefetch thread must not allocate while the device runs.
        """
        for slot in self.slots:
            for name, view in like.feed.items():
                self.buffer(slot.inputs, name, view.shape, view.dtype)
            for name, view in like.result.items():
                self.buffer(slot.outputs, name, view.shape, view.dtype)


class DeviceAdapter(Protocol):
    """The device side of a pipeline (one runner's graph on one device).

    ``ring``: the adapter's own ring, reused across calls (``None``: each call makes one with ``allocate``).

    ``submit_blocks`` (optional, default false): ``submit`` returns only once the batch's compute is done (onnxruntime
    replaying a CUDA graph). Such an adapter with a ``stage`` method gets the next batch staged before each submit.

    ``stage(slot) -> handle`` (optional): enqueue only the copy of ``slot``'s inputs to the device, without waiting;
    ``wait`` takes the handle (it lands when the inputs are on the device), and ``submit`` of that slot then skips the
    copy. ``submit`` of a slot not staged stages it itself.
    """

    ring: HostRing | None

    def submit(self, slot: Slot) -> Any:
        """Enqueue copy-in (unless :meth:`stage` did), compute and copy-out of ``slot`` (asynchronously) and return a
        handle to wait on."""

    def wait(self, handle: Any) -> None:
        """Block until the batch of ``handle`` has landed in its slot's output buffers (or, for a handle from
        :meth:`stage`, until its inputs are on the device)."""

    def output_specs(self) -> Mapping[str, tuple[tuple[int, ...], np.dtype]]:
        """Per output: the shape of one item and the dtype, for the slots' output buffers."""


class HostAdapter:
    """Runs the pipeline's steps synchronously on the host with ``compute(feed) -> outputs``: the reference
    behaviour, used on the CPU and in the tests."""

    def __init__(self, compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], outputs):
        self.compute = compute
        self._outputs = outputs

    def output_specs(self):
        return self._outputs

    def submit(self, slot: Slot) -> Any:
        result = self.compute(slot.feed)
        for name, y in result.items():
            slot.result[name][...] = y[: slot.result[name].shape[0]]
        return None

    def wait(self, handle: Any) -> None:
        return None


def run_pipeline(
    inputs: Mapping[str, np.ndarray],
    adapter: DeviceAdapter,
    batch_size: int,
    allocate: Allocate = lambda shape, dtype: np.empty(shape, dtype),
    dtypes: Mapping[str, Any] | None = None,
    depth: int | None = None,
    fixed_batch: bool = False,
    prepare: Callable[[int, int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ring: HostRing | None = None,
    copy_threads: int | None = None,
    hold: bool = False,
) -> Iterator[tuple]:
    """Stream ``inputs`` through ``adapter`` in batches; yield ``(start, stop, outputs)`` in order of ``start``.

    The yielded outputs are views of the slot's buffers, valid until the next item is requested (copy or write
    them out at once). With ``hold``, they stay valid until the consumer calls the fourth element of what is
    yielded, ``(start, stop, outputs, release)``: the consumer may write a batch out on another thread while the
    pipeline goes on with the next ones (the slot is handed out again only once released). Every yielded batch must
    be released, and released before the generator is closed.

    Args:
        inputs: Arrays of ``N`` rows each (memory-mapped bundles welcome: rows are read in the prefetch thread).
        adapter: Does the device work.
        batch_size: Rows per batch.
        allocate: Allocates a host buffer (page-locked on a GPU).
        dtypes: Dtype of each input as the graph takes it (default float32).
        depth: Slots in the ring: how many batches may be in flight or being filled at once (default
            :func:`default_depth`: :data:`STAGED_DEPTH` where the pipeline stages ahead, else :data:`DEFAULT_DEPTH`;
            one more with ``hold``).
        fixed_batch: Pad the last short batch to ``batch_size`` rows (zeros), as CUDA graph replay needs; padded
            rows never reach the caller.
        prepare: Finishes a feed in the prefetch thread (the indexed layout gathers neighbour embeddings there); its
            result is staged into the slot.
        ring: A ring to reuse across calls (its buffers stay allocated); default the adapter's own, if it has one.
        copy_threads: Threads that stage each batch into its slot (one core's memory copy is slower than the bus;
            default :func:`~deepspot.runtime._copy.default_copy_threads`).
        hold: The consumer releases each batch itself (see above).

    Where :func:`stages_ahead` holds for ``adapter``, each batch's copy to the device is enqueued
    (``adapter.stage``) before the previous batch is submitted, so that it runs while that batch computes.

    Raises:
        Whatever the prefetch thread or the adapter raised, once, after the thread has stopped.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    n = next(iter(inputs.values())).shape[0]
    dtypes = dict(dtypes or {})
    threads = copy_threads or default_copy_threads()
    ahead = stages_ahead(adapter)
    depth = depth if depth is not None else default_depth(adapter, hold)
    ring = ring if ring is not None else getattr(adapter, "ring", None) or HostRing(depth, allocate)
    specs = adapter.output_specs()
    filled: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = object()

    def fill(slot: Slot, start: int, end: int) -> None:
        rows = batch_size if fixed_batch else end - start
        feed = {k: v[start:end] for k, v in inputs.items()}
        if prepare is not None:
            feed = prepare(start, end, {k: np.asarray(v) for k, v in feed.items()})
        slot.start, slot.stop = start, end
        views = {}
        for name, a in feed.items():
            if stop.is_set():  # the consumer has gone: a batch nobody will read is not worth staging
                return
            view = ring.buffer(slot.inputs, name, (rows,) + a.shape[1:], dtypes.get(name, np.float32))
            copy_rows(view[: end - start], a, threads)  # the bundle's pages are read here, off the main thread
            if rows > end - start:
                view[end - start :] = 0  # padding: finite, independent of the real rows, dropped on the way out
            views[name] = view
        slot.feed = views
        slot.result = {
            name: ring.buffer(slot.outputs, name, (rows,) + tuple(shape), dtype) for name, (shape, dtype) in specs.items()
        }

    def work() -> None:
        try:
            for start in range(0, n, batch_size):
                slot = ring.acquire(stop)
                if slot is None:
                    return
                fill(slot, start, min(start + batch_size, n))
                if stop.is_set():
                    return
                if start == 0:
                    ring.reserve(slot)  # before the first batch is handed out: no allocation while the device runs
                filled.put(slot)
            filled.put(done)
        except BaseException as e:  # handed to the consumer, raised there once
            filled.put(e)

    worker = threading.Thread(target=work, name="deepspot-pipeline-fill", daemon=True)
    worker.start()
    staged: deque[Slot] = deque()  # inputs on their way to the device, not submitted yet (when staging ahead)
    in_flight: deque[Slot] = deque()  # submitted: computing or on their way back

    def submit() -> None:
        slot = staged[0]
        slot.handle = adapter.submit(slot)  # while it runs the slot stays in ``staged``: its upload is waited for
        in_flight.append(staged.popleft())

    try:
        finished = False
        while not finished or staged or in_flight:
            # Keep up to depth - 1 batches staged or in flight; the remaining slot is the one being filled.
            while not finished and len(staged) + len(in_flight) < len(ring.slots) - 1:
                item = filled.get()
                if item is done:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                staged.append(item)
                if ahead:
                    item.handle = adapter.stage(item)  # its copy runs while the batch before it computes
                    if len(staged) > 1:
                        submit()  # blocks until that batch computed; the next one is on its way meanwhile
                else:
                    submit()
            if staged and (finished or not in_flight):  # the last batch, or a ring too small to stage ahead
                submit()
            if not in_flight:
                continue
            slot = in_flight.popleft()
            adapter.wait(slot.handle)
            outputs = {k: v[: slot.rows] for k, v in slot.result.items()}
            if hold:
                yield slot.start, slot.stop, outputs, ring.releaser(slot)
            else:
                yield slot.start, slot.stop, outputs
                ring.release(slot)
    finally:
        stop.set()
        # An error or an early stop: let the device finish (the copies of a staged batch included) before the buffers
        # are reused.
        for slot in (*in_flight, *staged):
            if slot.handle is None:
                continue
            try:
                adapter.wait(slot.handle)
            except Exception:  # noqa: BLE001  the first error is the one being raised
                pass
        # No time-out: a fill still running after it would go on writing into a slot that the reset below hands to
        # the next call on this ring (a batch read from a slow disk can take seconds). Filling checks ``stop`` between
        # inputs, so the wait is at most one input's copy; Ctrl-C still interrupts it.
        worker.join()
        ring.reset()  # the ring may serve the next call (an adapter's own ring does)


__all__ = [
    "DEFAULT_DEPTH",
    "STAGED_DEPTH",
    "DeviceAdapter",
    "HELD_DEPTH",
    "HostAdapter",
    "HostRing",
    "Slot",
    "default_depth",
    "run_pipeline",
    "stages_ahead",
]
