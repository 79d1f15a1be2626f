"""The indexed head with its gathers in the graph (the table bound once, where the head runs): ``ort-cuda``'s path,
run here on ``ort-cpu`` with the same binding code."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from deepspot.cli import app
from deepspot.data import save_bundle
from deepspot.errors import CheckpointError, ConfigError
from deepspot.export.indexed import export_indexed
from deepspot.export.metadata import ENCODER_FILE, HEAD_EMBEDDING, HEAD_FILE, HEAD_NEIGHBORS
from deepspot.runtime.backends import RunnerOptions
from deepspot.runtime.gather_graph import ITEM_INDEX, NEIGHBOR_INDEX, TABLE_INPUT, OrtGatherHead, gather_head
from deepspot.runtime.indexed import load_pipeline, pipeline_from_folder, predict_indexed
from deepspot.runtime.ort import OrtRunner

from .test_indexed import CASES, NEIGHBOR_MODES, _dense_reference, _graph, _model

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One indexed export per mode and neighbour pooling."""
    made = {}

    def get(mode, agg="max"):
        if (mode.key, agg) not in made:
            model = _model(mode, agg)
            made[mode.key, agg] = model, export_indexed(model, tmp_path_factory.mktemp("idx") / "indexed")
        return made[mode.key, agg]

    return get


@pytest.mark.parametrize("mode", NEIGHBOR_MODES, ids=lambda m: m.key)
def test_the_rewritten_head_takes_a_table_and_indices(folders, mode):
    _, folder = folders(mode)
    head = onnx.load(str(folder / HEAD_FILE))
    rewritten = gather_head(head)
    names = [i.name for i in rewritten.graph.input]
    subspot = ["subspot"] if "subspot" in mode.input_names else []
    assert names == [TABLE_INPUT, ITEM_INDEX, *subspot, NEIGHBOR_INDEX]
    assert HEAD_EMBEDDING not in names and HEAD_NEIGHBORS not in names
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops[:5] == ["Constant", "Add", "Gather", "Add", "Gather"]
    assert ops[5:] == [n.op_type for n in head.graph.node]  # the head itself, unchanged
    onnx.checker.check_model(rewritten, full_check=True)
    assert [i.name for i in head.graph.input][0] == HEAD_EMBEDDING  # the loaded head itself is left as it was
    with pytest.raises(CheckpointError, match="not the head of an indexed export"):
        gather_head(onnx.load(str(folder / ENCODER_FILE)))


@pytest.mark.parametrize("mode, agg", CASES)
def test_gathering_in_the_graph_equals_gathering_on_the_host(folders, mode, agg):
    model, folder = folders(mode, agg)
    arrays = _graph(mode)  # padding, repeats, self-loops, neighbours in other batches
    options = RunnerOptions(batch_size=8)
    with pipeline_from_folder(folder, "ort-cpu", options, device_gather=True) as pipeline:
        assert isinstance(pipeline.head, OrtGatherHead)
        assert set(pipeline.head.input_names) == {ITEM_INDEX, NEIGHBOR_INDEX} | set(mode.input_names) - {
            mode.bags[0].name, "neighbors"}  # fmt: skip
        got, location = predict_indexed(pipeline, arrays, batch_size=8)
    assert location == "device"
    with pipeline_from_folder(folder, "ort-cpu", options) as pipeline:  # ort-cpu gathers on the host by default
        assert not isinstance(pipeline.head, OrtGatherHead)
        expected, location = predict_indexed(pipeline, arrays, batch_size=8)
    assert location == "memory"
    # Max pooling on the host runs while gathering (np.maximum), in the graph as ReduceMax: both exact.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * (1 + np.abs(expected).max()))
    np.testing.assert_allclose(got, _dense_reference(model, arrays), rtol=0, atol=1e-5 * (1 + np.abs(expected).max()))


def test_fixed_buffers_pad_the_last_batch(folders, monkeypatch):
    # What CUDA graph replay needs (fixed shapes and addresses), on the CPU: 37 items in batches of 8, the last of 5
    # padded with index 0, which must not leak into the real rows.
    mode = NEIGHBOR_MODES[-1]
    _, folder = folders(mode)
    arrays = _graph(mode)
    with pipeline_from_folder(folder, "ort-cpu", RunnerOptions(batch_size=8)) as pipeline:
        expected, _ = predict_indexed(pipeline, arrays, batch_size=8)
        head = pipeline.head
        other = _graph(mode, n=45, seed=1)  # a second slide: another table size and neighbour count
        other["neighbor_index"] = np.concatenate([other["neighbor_index"], other["neighbor_index"][:, :2]], axis=1)
        expected_other, _ = predict_indexed(pipeline, other, batch_size=8)
        import deepspot.runtime.gather_graph as module

        rewrites = []
        monkeypatch.setattr(module, "gather_head", lambda h, real=module.gather_head: rewrites.append(1) or real(h))
        fixed = OrtRunner(head.path, "ort-cpu", head.info, cuda_graph=True, io_binding=True)
        pipeline.head = OrtGatherHead(fixed).activate()
        try:
            got, _ = predict_indexed(pipeline, arrays, batch_size=8)
            # The buffers fixed on the first slide (as a captured graph is) must not serve the second one.
            got_other, _ = predict_indexed(pipeline, other, batch_size=8)
        finally:
            pipeline.head.deactivate()
            pipeline.head = head
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * (1 + np.abs(expected).max()))
    np.testing.assert_allclose(got_other, expected_other, rtol=0, atol=1e-6 * (1 + np.abs(expected_other).max()))
    assert len(rewrites) == 1  # a new session per slide, but the head is rewritten once


@contextlib.contextmanager
def _under_cuda_graphs(pipeline, batch_size: int = 8):
    """The pipeline's encoder and head swapped for runners with ``ort-cuda``'s defaults (CUDA graphs, IO binding) on
    the CPU, for the duration; the host runners are put back after."""
    host = pipeline.encoder, pipeline.head

    def graphed(runner):
        return OrtRunner(runner.path, "ort-cpu", runner.info, cuda_graph=True, io_binding=True, batch_size=batch_size)

    pipeline.encoder, pipeline.head = graphed(host[0]).activate(), OrtGatherHead(graphed(host[1])).activate()
    try:
        yield pipeline
    finally:
        pipeline.encoder.deactivate()
        pipeline.head.deactivate()
        pipeline.encoder, pipeline.head = host


def test_both_graphs_under_cuda_graphs_over_two_slides(folders, replaying):
    """``ort-cuda``'s defaults on the CPU: encoder and head capture CUDA graphs (replayed here as the CUDA provider
    replays them). The encoder's first run is the zero tile (one row), then full and short batches; the head's table
    changes with the slide."""
    mode = NEIGHBOR_MODES[-1]
    _, folder = folders(mode)
    slides = [_graph(mode), _graph(mode, n=45, seed=1)]
    with pipeline_from_folder(folder, "ort-cpu", RunnerOptions(batch_size=8)) as pipeline:
        expected = [predict_indexed(pipeline, arrays, batch_size=8)[0] for arrays in slides]
        with _under_cuda_graphs(pipeline):
            got = [predict_indexed(pipeline, arrays, batch_size=8)[0] for arrays in slides]
            encoder_graphs = [(g.id, g.rows) for g in pipeline.encoder._io.graphs.graphs]
    for x, y in zip(expected, got):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6 * (1 + np.abs(x).max()))
    assert encoder_graphs == [(1, 8)]  # the zero tile padded into the batch's graph, not a graph of its own
    bound = [s for s in replaying if s.graph_ids]  # the encoder's session, and the head's for each slide
    assert len(bound) == 3 and all(1 in s.captured and 0 not in s.graph_ids for s in bound)


def test_slides_of_one_size_keep_the_heads_session_and_its_graphs(folders, replaying):
    """A benchmark's repeats (or a cohort's slides of one size): the table of the last slide is rewritten in place,
    so the head's graphs, captured on its address, replay with the new slide's rows instead of a new session being
    made and captured for each slide (seconds on a GPU, more than the head's whole pass)."""
    mode = NEIGHBOR_MODES[-1]
    _, folder = folders(mode)
    slides = [_graph(mode), _graph(mode, seed=1), _graph(mode), _graph(mode, n=45, seed=2)]
    with pipeline_from_folder(folder, "ort-cpu", RunnerOptions(batch_size=8)) as pipeline:
        expected = [predict_indexed(pipeline, arrays, batch_size=8)[0] for arrays in slides]
        with _under_cuda_graphs(pipeline):
            got = [predict_indexed(pipeline, arrays, batch_size=8)[0] for arrays in slides]
    for x, y in zip(expected, got):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6 * (1 + np.abs(x).max()))
    bound = [s for s in replaying if s.graph_ids]  # the encoder's, the head's for 37 items, and for 45
    assert len(bound) == 3 and all(1 in s.captured for s in bound)


@pytest.mark.parametrize("table_dtype", ["fp32", "fp16"])
def test_the_encoder_writes_the_table_where_the_head_reads_it(tmp_path, monkeypatch, table_dtype):
    """ort-cuda's indexed path: the encoder's outputs are copied into the head's table on the device, batch by
    batch, and no embedding goes through the host. Here on ort-cpu with IO binding (the same code on host memory)."""
    import deepspot.runtime.indexed as indexed

    mode = NEIGHBOR_MODES[-1]
    model = _model(mode)
    folder = export_indexed(model, tmp_path / "indexed", table_dtype=table_dtype)
    arrays = _graph(mode)
    with pipeline_from_folder(folder, "ort-cpu", RunnerOptions(batch_size=8), device_gather=True) as pipeline:
        expected, _ = predict_indexed(pipeline, arrays, batch_size=8)  # the encoder's outputs through the host
        host = pipeline.encoder
        pipeline.encoder = OrtRunner(host.path, "ort-cpu", host.info, io_binding=True, batch_size=8).activate()
        monkeypatch.setattr(indexed, "embedding_table", lambda *a, **k: pytest.fail("a table on the host was made"))
        try:
            timings = {}
            got, location = predict_indexed(pipeline, arrays, batch_size=8, timings=timings)
        finally:
            pipeline.encoder.deactivate()
            pipeline.encoder = host
    assert location == "device" and set(timings) == {"encoder", "table", "head"}
    np.testing.assert_array_equal(got, expected)  # the same embeddings, bit for bit, in the same table dtype
    np.testing.assert_allclose(got, _dense_reference(model, arrays), rtol=0,
                               atol=(1e-5 if table_dtype == "fp32" else 5e-3) * (1 + np.abs(got).max()))  # fmt: skip


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["cuda-graph", "no-graph"])
@pytest.mark.parametrize("seed", range(4))
def test_both_passes_through_the_pipeline_in_any_stream_order(folders, replaying, cuda_graph, seed):
    """ort-cuda's indexed path end to end on stand-ins: the encoder's pipeline writes the table on the device, the
    head's pipeline gathers from it, every stream's work deferred and run in a random order the events allow, over
    two slides."""
    from .graph_replay import AsyncHostCuda

    mode = NEIGHBOR_MODES[-1]
    _, folder = folders(mode)
    slides = [_graph(mode), _graph(mode, n=45, seed=1)]
    with pipeline_from_folder(folder, "ort-cpu", RunnerOptions(batch_size=8), device_gather=True) as pipeline:
        expected = [predict_indexed(pipeline, arrays, batch_size=8)[0] for arrays in slides]
        host = pipeline.encoder, pipeline.head
        cuda = AsyncHostCuda(seed)
        compute = cuda.stream()
        replaying.cuda_graphs, replaying.device = cuda_graph, (cuda, compute)

        def on_device(runner):
            device = OrtRunner(runner.path, "ort-cpu", runner.info, cuda_graph=cuda_graph, io_binding=True,
                               batch_size=8)  # fmt: skip
            device._cuda, device._compute_stream = cuda, compute
            return device

        encoder, head = on_device(host[0]), OrtGatherHead(on_device(host[1]))
        head._cuda, head._compute_stream = cuda, compute
        pipeline.encoder, pipeline.head = encoder.activate(), head.activate()
        try:
            got = []
            for arrays in slides:
                got.append(predict_indexed(pipeline, arrays, batch_size=8)[0])
                assert encoder._adapter is not None and head._adapter is not None  # both passes went through it
        finally:
            encoder.deactivate()
            head.deactivate()
            pipeline.encoder, pipeline.head = host
    for x, y in zip(expected, got):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6 * (1 + np.abs(x).max()))
    assert cuda.host == {} and cuda.events == set() and set(cuda.streams) == {compute}  # all given back


def test_the_table_must_be_loaded_first(folders):
    _, folder = folders(NEIGHBOR_MODES[0])
    with pipeline_from_folder(folder, "ort-cpu", RunnerOptions(batch_size=8), device_gather=True) as pipeline:
        feed = {ITEM_INDEX: np.arange(2), NEIGHBOR_INDEX: np.zeros((2, 3), dtype=np.int64)}
        with pytest.raises(RuntimeError, match="load_table"):
            pipeline.head.infer(feed, check_inputs=False)


def test_cli_table_on_the_device(folders, tmp_path):
    mode = NEIGHBOR_MODES[0]
    _, folder = folders(mode)
    arrays = _graph(mode)
    bundle = save_bundle(tmp_path / "slide.npz", arrays)
    outputs = {}
    for table in ("device", "memory"):
        out = tmp_path / f"{table}.npy"
        result = runner.invoke(app, ["infer", str(folder), "-i", str(bundle), "-o", str(out), "--backend", "ort-cpu",
                                     "--table", table, "--batch-size", "8", "--no-progress"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert ("table on the device" if table == "device" else "table in memory") in result.output
        outputs[table] = np.load(out)
    np.testing.assert_allclose(outputs["device"], outputs["memory"], rtol=0, atol=1e-6)

    result = runner.invoke(app, ["infer", str(folder), "-i", str(bundle), "-o", str(tmp_path / "x.npy"),
                                 "--table", "gpu", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2
    assert "unknown table location 'gpu'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.npy").exists()


def test_an_unknown_table_location_is_refused_before_loading(folders):
    _, folder = folders(NEIGHBOR_MODES[0])
    with pytest.raises(ConfigError, match="unknown table location"):
        load_pipeline(folder, "ort-cpu", table="gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("mode, agg", CASES)
def test_ort_cuda_gathers_from_a_table_on_the_gpu(require, folders, mode, agg):
    require("ort-cuda")
    model, folder = folders(mode, agg)
    arrays = _graph(mode)
    expected = _dense_reference(model, arrays)
    with pipeline_from_folder(folder, "ort-cuda", RunnerOptions(batch_size=8)) as pipeline:
        assert isinstance(pipeline.head, OrtGatherHead)  # the default on ort-cuda
        got, location = predict_indexed(pipeline, arrays, batch_size=8)
        assert location == "device"
        again, _ = predict_indexed(pipeline, _graph(mode, n=45, seed=1), batch_size=8)  # a second slide: recaptured
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * (1 + np.abs(expected).max()))
    other = _dense_reference(model, _graph(mode, n=45, seed=1))
    np.testing.assert_allclose(again, other, rtol=0, atol=1e-5 * (1 + np.abs(other).max()))
