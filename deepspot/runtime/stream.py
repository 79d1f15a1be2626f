"""Streaming batch inference over a memory-mapped feature bundle.

Memory stays flat in the number of items: inputs are memory-mapped and read one batch at a time, a background
thread prepares the next batch (slice, ``float32``, C order) while the runner works on the current one, and
predictions go straight into a memory-mapped ``.npy`` beside the output, renamed into place only when the run
has finished. A failed or interrupted run leaves no output file.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .._pages import release_rows, row_blocks
from ..data import MAX_BAG, check_bag_size
from ..errors import ConfigError, DeepSpotError, InputError
from ._copy import copy_rows, default_copy_threads, first_nonfinite
from .base import OUTPUT_NAME, ModelInfo, Runner

CHECK_CHUNK_BYTES = 64 << 20  # finiteness is checked this many bytes at a time, whatever the bundle's size


class NonFinitePrediction(DeepSpotError):
    """A prediction came out NaN or inf although every input was finite: the model overflowed."""

    def __init__(self, row: int):
        self.row = row
        super().__init__(
            f"the prediction for item {row} is not finite (NaN or inf) although its inputs are: the model overflows "
            "on them (an fp16 model's range ends at 65504; an fp32 export does not); nothing was written"
        )


def _raise_nonfinite(y: np.ndarray, start: int) -> None:
    row = first_nonfinite(y)
    if row is not None:
        raise NonFinitePrediction(start + row)


def check_inputs(
    inputs: Mapping[str, np.ndarray],
    info: ModelInfo,
    source: str = "input",
    max_bag: int = MAX_BAG,
    dtypes: Mapping[str, Any] | None = None,
) -> int:
    """Check model inputs before anything runs; return the number of items.

    Names, ranks and feature sizes against the model's metadata, equal item counts, bag sizes up to ``max_bag``,
    then finite values, chunk by chunk so that memory stays bounded on a memory-mapped bundle: finite once cast to
    the graph's input dtype (``dtypes``, by input name; float32 by default), so that an fp32 bundle with a value
    beyond float16's range is refused by an fp16-input graph instead of becoming inf in it.

    Raises:
        InputError: The first problem; a non-finite value is reported with its input name and row index.
    """
    specs = info.input_specs()
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise InputError(
            f"{source}: missing input {missing[0]!r}; a {info.family}/{info.mode} model takes {', '.join(specs)}"
        )
    extra = [n for n in inputs if n not in specs]
    if extra:
        raise InputError(
            f"{source}: unexpected input {extra[0]!r}; a {info.family}/{info.mode} model takes {', '.join(specs)}"
        )
    n = None
    for name, spec in specs.items():
        a = inputs[name]
        shape = "(N, 1, D)" if spec.shape[1] == 1 else "(N, T, D)"
        if a.ndim != 3 or (spec.shape[1] == 1 and a.shape[1] != 1):
            raise InputError(f"{source}: {name!r} must have shape {shape}, got {a.shape}")
        if a.shape[2] != info.input_size:
            raise InputError(f"{source}: {name!r} has {a.shape[2]} features, the model expects {info.input_size}")
        if a.shape[1] == 0:
            raise InputError(f"{source}: {name!r} has an empty bag axis: {a.shape}")
        check_bag_size(name, a.shape[1], source, max_bag)
        if a.dtype.kind != "f":
            raise InputError(f"{source}: {name!r} must be floating point, got {a.dtype}")
        if n is not None and a.shape[0] != n:
            raise InputError(f"{source}: {name!r} has {a.shape[0]} rows, {next(iter(specs))!r} has {n}")
        n = a.shape[0]
    for name in specs:
        report_nonfinite(inputs[name], name, source, (dtypes or {}).get(name, np.float32))
    return int(n)


def report_nonfinite(a: np.ndarray, name: str, source: str, dtype: Any = np.float32) -> None:
    """Raise :class:`InputError` naming the first row of ``a`` that is not finite once cast to ``dtype`` (the graph's
    input type; float32, or float16 for an fp16-input graph)."""
    target = np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.dtype(np.float32)  # what the values become
    row = first_nonfinite_row(a, target=target)
    if row is not None:
        what = "a non-finite value (NaN or inf)"
        if np.isfinite(np.asarray(a[row], dtype=np.float64)).all():
            what = f"a value beyond {target.name}'s range (it would become inf)"
        raise InputError(f"{source}: {name!r} holds {what} in row {row}")


def first_nonfinite_row(a: np.ndarray, chunk_bytes: int = CHECK_CHUNK_BYTES, target: Any = np.float32) -> int | None:
    """Index of the first row of ``a`` with a NaN or inf, reading ``chunk_bytes`` at a time; ``None`` if none.

    Values of a wider type than ``target`` (the graph's input type) count as infinite where the cast to it would
    make them inf (float64 beyond float32's range; float32 beyond float16's).
    """
    target = np.dtype(target)
    narrowing = a.dtype.kind == "f" and a.dtype.itemsize > target.itemsize
    for start, stop in row_blocks(a.shape[0], a[:1].nbytes, chunk_bytes):
        chunk = a[start:stop]
        if narrowing:
            with np.errstate(over="ignore", invalid="ignore"):
                chunk = chunk.astype(target)  # exactly what the cast does, rounding at the edge included
        row = first_nonfinite(chunk)
        release_rows(a, start, stop)
        if row is not None:
            return start + row
    return None


def batches(
    inputs: Mapping[str, np.ndarray],
    batch_size: int,
    dtypes: Mapping[str, str] | None = None,
    depth: int = 2,
    prepare: Callable[[int, int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield ``(start, stop, feed)`` batches, prepared by a background thread ``depth`` batches ahead.

    The worker slices each input and makes it a C-contiguous array of the graph's dtype (this is where the pages of
    a memory-mapped bundle are read); NumPy copies without the GIL, so it overlaps with the runner's work.
    ``prepare(start, stop, feed)``, if given, finishes each feed in the worker too (the indexed layout gathers
    neighbour embeddings there).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    n = next(iter(inputs.values())).shape[0]
    dtypes = dtypes or {}
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for start in range(0, n, batch_size):
                stop_ = min(start + batch_size, n)
                # A real copy even where the slice is already contiguous float32: reading the pages of a
                # memory-mapped bundle is the work this thread exists to take off the runner's path.
                feed = {
                    k: np.array(v[start:stop_], dtype=dtypes.get(k, "float32"), order="C") for k, v in inputs.items()
                }
                for v in inputs.values():
                    release_rows(v, start, stop_)  # read once: keep the resident set flat in N
                if prepare is not None:
                    feed = prepare(start, stop_, feed)
                if not put((start, stop_, feed)):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it in the main thread
            put(e)

    worker = threading.Thread(target=work, name="deepspot-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped (finished, failed or interrupted): let the worker end
        worker.join(timeout=5)


def predict(
    runner: Runner,
    inputs: Mapping[str, np.ndarray],
    batch_size: int = 256,
    out: np.ndarray | None = None,
    inverse_transform: bool = False,
    progress: bool = False,
    prepare: Callable[[int, int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    pipelined: bool | None = None,
    fixed_batch: bool = False,
    check_finite: bool = False,
) -> np.ndarray:
    """Run an active ``runner`` over every item of in-memory arrays in batches; write into ``out`` (allocated if
    ``None``) and return it, ``(N, G)`` float32.

    ``inputs`` maps the runner's input names to arrays ``(N, n, D)`` (``Bundle.inputs(mode)`` gives a bundle's);
    ``inverse_transform`` maps each batch back through the model's scaler, ``progress`` draws a bar on stderr.

    Inputs are not checked here (see :func:`check_inputs`); the runner checks each batch's names and ranks.
    ``prepare`` finishes each feed in the prefetch thread (see :func:`batches`); inputs the graph does not take
    (such as ``neighbor_index``) keep their own dtype.

    On a GPU runner that offers one (``torch-cuda``, ``ort-cuda``), batches go through the overlapping device
    pipeline of :mod:`deepspot.runtime.pipeline` (``pipelined=None``, the default); ``pipelined=False`` turns it
    off, and ``pipelined=True`` runs the pipeline's ring on the host for runners without one (tests, comparisons).
    ``fixed_batch`` pads the last batch to ``batch_size`` rows (CUDA graph replay).

    ``check_finite`` checks each batch's predictions as they are written and raises :class:`NonFinitePrediction` at
    the first that is NaN or inf: with inputs checked finite, that is the model overflowing (an fp16 graph's range
    ends at 65504), and a prediction of NaN must not pass for a result.
    """
    n = next(iter(inputs.values())).shape[0]
    g = runner.info.output_size if runner.info else None
    specs = runner.get_input_metadata()
    # Every input the graph takes gets its dtype, those that ``prepare`` makes too (the staging buffers of the
    # pipeline are allocated at it); an input only ``prepare`` reads keeps its own, indices widened to int64 so that
    # arithmetic on them (``+ 1``) cannot wrap in a small integer type.
    dtypes = {k: spec.dtype for k, spec in specs.items()}
    for k, a in inputs.items():
        if k not in specs:
            dtypes[k] = np.dtype(np.int64) if a.dtype.kind in "iu" else a.dtype
    pipeline = runner.pipeline_adapter(batch_size) if pipelined is not False else None
    if pipeline is None and pipelined:
        from .pipeline import HostAdapter

        g_out = (g,) if g else None
        pipeline = HostAdapter(lambda feed: runner.infer(feed, check_inputs=False),
                               {OUTPUT_NAME: (g_out, np.dtype(np.float32))}), None  # fmt: skip
    if pipeline is not None:
        return _predict_pipelined(runner, inputs, batch_size, out, inverse_transform, progress, prepare, pipeline,
                                  dtypes, fixed_batch, check_finite)  # fmt: skip
    if out is None and n == 0 and g:
        out = np.empty((0, g), dtype=np.float32)  # no batch to size it by: an empty (0, G), as the pipeline gives
    with _progress(progress, n) as bar:
        for start, stop, feed in batches(inputs, batch_size, dtypes, prepare=prepare):
            outputs = runner.infer(feed, check_inputs=start == 0)
            y = outputs.get(OUTPUT_NAME, next(iter(outputs.values())))
            if inverse_transform:
                y = runner.info.inverse_transform(y)
            if out is None:
                out = np.empty((n, g or y.shape[1]), dtype=np.float32)
            out[start:stop] = y
            if check_finite:
                _raise_nonfinite(y, start)
            release_rows(out, start, stop)  # written pages stay in the file, not in this process
            bar(stop - start)
    return out


def _predict_pipelined(runner, inputs, batch_size, out, inverse_transform, progress, prepare, pipeline, dtypes,
                       fixed_batch, check_finite=False):  # fmt: skip
    from .pipeline import run_pipeline

    adapter, allocate = pipeline
    n = next(iter(inputs.values())).shape[0]
    if out is None:
        out = np.empty((n, runner.info.output_size), dtype=np.float32)
    kwargs = {"allocate": allocate} if allocate is not None else {}
    threads = default_copy_threads()

    def write(start: int, stop: int, outputs: dict[str, np.ndarray], release: Callable[[], None]) -> None:
        try:
            y = outputs.get(OUTPUT_NAME, next(iter(outputs.values())))
            if inverse_transform:
                y = runner.info.inverse_transform(y)
            # On several threads (one core copies slower than the bus); each checks the rows it copied, in cache.
            bad = copy_rows(out[start:stop], y, threads, check_finite=check_finite)
        finally:
            release()  # the slot goes back to the ring, for a batch yet to come
        if bad is not None:
            raise NonFinitePrediction(start + bad)
        for v in inputs.values():
            release_rows(v, start, stop)
        release_rows(out, start, stop)
        bar(stop - start)

    with _progress(progress, n) as bar:
        stream = run_pipeline(inputs, adapter, batch_size, dtypes=dtypes, fixed_batch=fixed_batch, prepare=prepare,
                              copy_threads=threads, hold=True, **kwargs)  # fmt: skip
        # Each batch is written out by a thread of its own while the pipeline goes on: the next batch's submit (which
        # returns only once it has computed, on onnxruntime with CUDA graphs) no longer waits for this one's write.
        with _Writer() as writer:
            try:
                for start, stop, outputs, release in stream:
                    writer.put(write, start, stop, outputs, release)
                writer.finish()
            except Exception:
                # The pipeline failed on a batch after those handed to the writer: a write that failed is about an
                # earlier batch (a NaN in its predictions, a full disk), and the first error in order is the one said.
                earlier = writer.drain() if writer.raised is None else None
                if earlier is not None:
                    raise earlier  # noqa: B904  the pipeline's error stays attached as its context
                raise
            finally:
                try:
                    writer.drain()  # no write still reading a slot when the pipeline hands its slots out again (an
                    # error of one is dropped: another is being raised already, or finish raised it)
                finally:
                    stream.close()  # even after a Ctrl-C in the wait: the fill thread ends, the device is waited for
    return out


class _Writer:
    """Writes batches out in order on one thread; an error is raised in the caller at its next :meth:`put` or at
    :meth:`finish`, the first one only."""

    def __init__(self):
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix="deepspot-write")
        self._pending: collections.deque = collections.deque()
        self.raised: BaseException | None = None  # the write error raised in the caller, if one was

    def put(self, fn, *args) -> None:
        self._raise_done()
        self._pending.append(self._pool.submit(fn, *args))

    def finish(self) -> None:
        """Wait for every write; raise the first error."""
        while self._pending:
            self._result(self._pending.popleft())

    def drain(self) -> BaseException | None:
        """Wait for every write; the error of the first one that failed and was not raised yet, if any."""
        futures.wait(self._pending)
        failed = next((f.exception() for f in self._pending if f.exception() is not None), None)
        self._pending.clear()
        return failed

    def _raise_done(self) -> None:
        while self._pending and self._pending[0].done():
            self._result(self._pending.popleft())

    def _result(self, future: futures.Future) -> None:
        try:
            future.result()
        except BaseException as e:
            self.raised = e
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


class ItemsPerSecond(ProgressColumn):
    """A rich progress column: items per second, from rich's own speed estimate."""

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} items/s", style="progress.data.speed")


class _progress:
    """Context manager yielding ``advance(k)``; a rich bar with items/s when enabled, a no-op otherwise."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda k: None
        columns = (
            TextColumn("inference"),
            BarColumn(),
            MofNCompleteColumn(),
            ItemsPerSecond(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        from rich.console import Console

        # On stderr: stdout is the command's result (a bar on stdout left a blank line there when piped).
        self.bar = Progress(*columns, transient=True, console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("inference", total=self.total)
        return lambda k: self.bar.update(task, advance=k)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
