"""``ort-cuda``'s device code on the CPU: CUDA graphs (fixed buffers, one per shape, named by ``gpu_graph_id``) and the
overlapping pipeline's adapter, across calls and slides, with a session that replays captured graphs as the CUDA
provider does (:mod:`tests.runtime.graph_replay`)."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest

from deepspot.errors import InputError
from deepspot.runtime import _ort_gpu, ort
from deepspot.runtime.artifacts import read_onnx
from deepspot.runtime.ort import OrtRunner
from deepspot.runtime.pipeline import DEFAULT_DEPTH, HELD_DEPTH, STAGED_DEPTH, HostRing
from deepspot.runtime.stream import predict

from .graph_replay import HostCuda, ReplaySession


def _device_runner(path, cuda_graph=True, batch_size=8, cuda=None):
    """An ``ort-cpu`` runner with ``ort-cuda``'s IO binding and pipeline adapter (on :class:`HostCuda`)."""
    runner = OrtRunner(path, "ort-cpu", read_onnx(path)[0], cuda_graph=cuda_graph, io_binding=True,
                       batch_size=batch_size)  # fmt: skip
    runner._cuda, runner._compute_stream = cuda or HostCuda(), 0
    return runner


def _plain_predictions(path, inputs):
    """What an ort-cpu runner without IO binding predicts for ``inputs`` and for them halved, batch by batch."""
    with ort.OrtRunner(path, "ort-cpu", read_onnx(path)[0]) as plain:
        return [predict(plain, x, 8, pipelined=False) for x in (inputs, _scaled(inputs, 0.5))]


def _graph_case(artifacts, replaying, cuda_graph, cuda):
    """The inputs of a tiny model, what a plain runner predicts for them (and for them halved), and a device runner
    on ``cuda`` whose stand-in session captures graphs or not."""
    a = artifacts()
    inputs = a.inputs()
    expected = _plain_predictions(a.onnx, inputs)
    replaying.cuda_graphs = cuda_graph
    return inputs, expected, _device_runner(a.onnx, cuda_graph, cuda=cuda)


@contextlib.contextmanager
def _deferred_case(artifacts, replaying, cuda_graph):
    """:func:`_graph_case` on streams whose work is deferred until the host waits (``AsyncHostCuda``), the runner
    open and computing on one of them: ``(cuda, compute stream, inputs, expected, runner)``."""
    from .graph_replay import AsyncHostCuda

    cuda = AsyncHostCuda()
    inputs, expected, runner = _graph_case(artifacts, replaying, cuda_graph, cuda)
    compute = cuda.stream()
    with runner:
        runner._compute_stream = compute
        replaying[-1].device = (cuda, compute)
        yield cuda, compute, inputs, expected, runner


def _scaled(inputs, factor):
    return {k: (v * factor).astype(v.dtype) for k, v in inputs.items()}


def test_the_stand_in_session_replays_on_the_captured_buffers(artifacts):
    """The emulation the other tests rely on: a graph id's third run computes on the buffers bound at its second."""
    a = artifacts()
    import onnxruntime

    session = ReplaySession(onnxruntime.InferenceSession(str(a.onnx), providers=["CPUExecutionProvider"]))
    inputs = a.inputs()
    options = onnxruntime.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "1")
    outputs = []
    for start in (0, 8, 16):
        binding = session.io_binding()
        for name, v in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(v[start : start + 8]))
        binding.bind_output("expression")
        session.run_with_iobinding(binding, options)
        outputs.append(binding.get_outputs()[0].numpy() if start < 16 else session.captured[1].get_outputs()[0].numpy())
    assert not np.allclose(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[2], outputs[1])  # replayed on rows 8-16, not the rows 16-24 it was given


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["cuda-graph", "no-graph"])
def test_the_pipeline_adapter_serves_every_call(artifacts, replaying, cuda_graph):
    """Several calls on one active runner (a cohort's slides, a benchmark's repeats): right answers every time, one
    ring allocated once, before the first batch runs, and every run naming its graph."""
    cuda = HostCuda()
    inputs, expected, runner = _graph_case(artifacts, replaying, cuda_graph, cuda)
    with runner:
        adapter, _ = runner.pipeline_adapter(8)
        allocations_at_submit = []
        submit = adapter.submit
        adapter.submit = lambda slot: allocations_at_submit.append(cuda.allocations) or submit(slot)
        got = [predict(runner, x, 8) for x in (inputs, _scaled(inputs, 0.5))]
        short = predict(runner, {k: v[:5] for k, v in inputs.items()}, 8)  # one short batch: padded into the graph
        assert runner.pipeline_adapter(8)[0] is adapter
        assert isinstance(adapter.ring, HostRing)
        pinned = cuda.allocations
        assert pinned == (len(inputs) + 1) * len(adapter.ring.slots)  # a buffer per input and output per slot
        assert set(allocations_at_submit) == {pinned}  # all of them before the first batch was submitted
        session = replaying[-1]
        if cuda_graph:
            assert set(session.graph_ids) == {1} and 1 in session.captured
            assert len(runner._io.graphs.graphs) == 1
        else:
            assert set(session.graph_ids) == {0} and not runner._io.graphs
    for x, y in zip(expected, got):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(short, expected[0][:5], rtol=0, atol=1e-6)
    assert cuda.host == {} and cuda.streams == set() and cuda.events == set()  # all freed when deactivated


def test_plain_runs_and_the_pipeline_share_the_graphs(artifacts, eager, replaying):
    """A slide's first call is one row (the indexed layout's zero tile), then full and short batches, then the
    pipeline: one graph of the batch size serves all of them."""
    a = artifacts()
    inputs = a.inputs()
    runner = _device_runner(a.onnx)
    with runner:
        for rows in ((0, 1), (0, 8), (8, 16), (32, 37), (16, 24)):
            feed = {k: v[slice(*rows)] for k, v in inputs.items()}
            np.testing.assert_allclose(runner.infer(feed)["expression"], eager(a.model, feed), atol=1e-5)
        piped = predict(runner, inputs, 8)
        graphs = runner._io.graphs.graphs
        assert [(g.id, g.rows) for g in graphs] == [(1, 8)]
        assert set(replaying[-1].graph_ids) == {1}
    np.testing.assert_allclose(piped, eager(a.model, inputs), atol=1e-5)


def test_each_shape_gets_its_graph_and_the_rest_run_without_one(artifacts, eager, replaying):
    a = artifacts()
    inputs = a.inputs()
    runner = _device_runner(a.onnx)
    with runner:
        for repeat in range(2):
            for bag in range(1, _ort_gpu.MAX_GRAPHS + 3):  # bags of 1 to 6 sub-spots: six signatures
                tiles = np.arange(bag) % inputs["subspot"].shape[1]
                feed = {k: (v[:8, tiles] if k == "subspot" else v[:8]) * (1 + repeat) for k, v in inputs.items()}
                np.testing.assert_allclose(runner.infer(feed)["expression"], eager(a.model, feed), atol=1e-5)
        graphs = runner._io.graphs.graphs
        assert [g.id for g in graphs] == list(range(1, _ort_gpu.MAX_GRAPHS + 1))
        ids = replaying[-1].graph_ids
        assert ids.count(-1) == 4 and 0 not in ids  # bags of 5 and 6, twice each; no run left to the default


def test_a_provider_with_one_graph_refuses_another_shape(artifacts):
    """onnxruntime's TensorRT provider captures one graph: another shape is a one-line error, not a wrong replay."""
    a = artifacts()
    inputs = a.inputs()
    runner = _device_runner(a.onnx)
    with runner:
        runner._io.graphs.annotated, runner._io.graphs.limit = False, 1
        runner.infer({k: v[:8] for k, v in inputs.items()})
        runner.infer({k: v[:3] for k, v in inputs.items()})  # padded into the graph: fine
        with pytest.raises(InputError, match="replays one graph only") as error:
            runner.infer({k: v[:16] for k, v in inputs.items()})
    assert "\n" not in str(error.value)


def test_a_constant_cannot_move_under_a_captured_graph(artifacts):
    a = artifacts()
    runner = _device_runner(a.onnx)
    with runner:
        runner.infer({k: v[:8] for k, v in a.inputs().items()})
        with pytest.raises(RuntimeError, match="replay on the old buffer"):
            runner._io.bind_constant("embedding_table", object())


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["cuda-graph", "no-graph"])
def test_the_resident_rate_runs_the_graph_on_device_buffers(artifacts, replaying, cuda_graph):
    a = artifacts()
    replaying.cuda_graphs = cuda_graph
    runner = _device_runner(a.onnx, cuda_graph)
    feed = {k: v[:8] for k, v in a.inputs().items()}
    with runner:
        rate = runner.resident_rate(feed, repeats=5)
        session = replaying[-1]
        assert rate > 0 and len(session.graph_ids) == 1 + 1 + 5  # warm-up, one untimed run, five timed
        if cuda_graph:
            assert set(session.graph_ids) == {1}
        expected = runner.infer(feed)["expression"]
    with ort.OrtRunner(a.onnx, "ort-cpu", read_onnx(a.onnx)[0]) as plain:
        np.testing.assert_allclose(expected, plain.infer(feed)["expression"], rtol=0, atol=1e-6)
        with pytest.raises(InputError, match="needs IO binding"):
            plain.resident_rate(feed)


def test_staging_takes_page_locked_memory_from_the_cuda_runtime_and_gives_it_back():
    """ort-cuda stages batches through cudaHostAlloc pages (no PyTorch needed), freed with the runner."""
    from deepspot.runtime._cuda import PinnedPool

    cuda = HostCuda()
    pool = PinnedPool(cuda)
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    view = pool.stage("x", a, rows=4)
    np.testing.assert_array_equal(view, np.vstack([a, np.zeros((1, 2), np.float32)]))
    assert view.ctypes.data in cuda.host and cuda.allocations == 1
    pool.stage("x", a[:2])  # smaller: the same pages
    assert cuda.allocations == 1
    pool.close()
    assert cuda.host == {}


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["cuda-graph", "no-graph"])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=lambda o: "".join(map(str, o)))
def test_the_pipeline_orders_its_streams_with_events(artifacts, replaying, cuda_graph, order):
    """The pipeline's copies and runs on streams whose work is deferred until the host waits, and then run in every
    order the events allow: each batch's upload, run and download must be ordered by events alone."""
    with _deferred_case(artifacts, replaying, cuda_graph) as (cuda, compute, inputs, expected, runner):
        adapter, _ = runner.pipeline_adapter(8)
        streams = [adapter.upload, compute, adapter.download]
        cuda.priority = [streams[i] for i in order]
        got = [predict(runner, x, 8) for x in (inputs, _scaled(inputs, 0.5))]
        plain_run = runner.infer({k: v[:8] for k, v in inputs.items()})["expression"]  # waits for its stream
    for x, y in zip(expected, got):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(plain_run, expected[0][:8], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["cuda-graph", "no-graph"])
def test_the_next_batch_is_uploaded_before_a_graph_replays(artifacts, replaying, cuda_graph):
    """onnxruntime's CUDA provider waits for the device after each graph replay, so the adapter's submit blocks: the
    copy of batch i + 1 to the device must be enqueued before batch i's graph runs, or copy and compute take turns.
    Without graphs a run returns at once and each batch is uploaded in its own submit, as before."""
    cuda = HostCuda()
    inputs, expected, runner = _graph_case(artifacts, replaying, cuda_graph, cuda)
    log: list[str] = []
    copy = cuda.copy_async

    def copy_async(dst, src, nbytes, kind, stream):
        if kind == cuda.H2D:
            log.append("upload")
        return copy(dst, src, nbytes, kind, stream)

    cuda.copy_async = copy_async
    with runner:
        adapter, _ = runner.pipeline_adapter(8)
        assert adapter.submit_blocks is cuda_graph
        # one slot more than the pipeline's own: predict holds each batch's slot while it writes the outputs out
        assert len(adapter.ring.slots) == (STAGED_DEPTH if cuda_graph else DEFAULT_DEPTH) + HELD_DEPTH
        session = replaying[-1]
        run = session.run_with_iobinding
        session.run_with_iobinding = lambda binding, options=None: log.append("run") or run(binding, options)
        got = predict(runner, inputs, 8)
    n = next(iter(inputs.values())).shape[0]
    batches, per_batch = -(-n // 8), len(inputs)
    runs = [i for i, what in enumerate(log) if what == "run"]
    assert len(runs) == batches >= 3 and log.count("upload") == batches * per_batch
    ahead = 2 if cuda_graph else 1  # batches whose inputs are on their way when batch k runs, counting k
    for k, at in enumerate(runs):
        assert log[:at].count("upload") == min(k + ahead, batches) * per_batch, (k, log)
    np.testing.assert_allclose(got, expected[0], rtol=0, atol=1e-6)


def test_an_error_on_the_device_is_the_one_raised_and_everything_is_freed(artifacts, replaying):
    """After a CUDA error every call on the context fails, freeing included: the runner frees what it can, and the
    error of the run, not the one of freeing after it, is the one raised (a GPU report must name what broke)."""
    cuda = HostCuda()
    a = artifacts()
    inputs = a.inputs()
    runner = _device_runner(a.onnx, cuda=cuda)
    destroy = cuda.destroy_event

    def broken(event):
        destroy(event)
        raise RuntimeError("cudaEventDestroy failed: an illegal memory access was encountered (error 700)")

    with pytest.raises(ValueError, match="the run broke") as raised:
        with runner:
            predict(runner, inputs, 8)
            cuda.destroy_event = broken
            raise ValueError("the run broke")
    assert any("illegal memory access" in note for note in getattr(raised.value, "__notes__", [None]))
    assert cuda.host == {} and cuda.streams == set() and cuda.events == set()  # all freed all the same
    assert runner.session is None and runner._adapter is None and runner._io is None


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["cuda-graph", "no-graph"])
def test_a_failed_submit_leaves_nothing_in_flight(artifacts, replaying, cuda_graph):
    """A run that fails after its batch's copies were enqueued: the ring hands the slot's buffers out again after the
    error, so the copies still queued on the streams must have finished by then (the pipeline waits only for the
    batches it submitted, and for a staged batch's upload)."""
    with _deferred_case(artifacts, replaying, cuda_graph) as (cuda, compute, inputs, expected, runner):
        session = replaying[-1]
        run, runs = session.run_with_iobinding, []

        def failing(binding, options=None):
            runs.append(1)
            if len(runs) == 3:
                raise RuntimeError("the third run fails")
            return run(binding, options)

        session.run_with_iobinding = failing
        with pytest.raises(RuntimeError, match="the third run fails"):
            predict(runner, inputs, 8)
        assert not any(cuda.queues.values()), {s: len(q) for s, q in cuda.queues.items() if q}
        session.run_with_iobinding = run
        np.testing.assert_allclose(predict(runner, inputs, 8), expected[0], rtol=0, atol=1e-6)  # the ring serves again
