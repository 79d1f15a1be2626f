"""fp16 features end to end: ``synth`` / ``bundle --dtype fp16``, an ``--io fp16`` graph, parity with fp32."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from deepspot.cli import app
from deepspot.data import cast_features, load_bundle
from deepspot.errors import InputError
from deepspot.runtime import TOLERANCES

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_fp16_features_through_an_fp16_graph_stay_within_the_fp16_tolerance(tmp_path):
    run("synth", "--family", "cell", "--mode", "neighbors", "--n", "200", "--input-size", "24", "--genes", "6",
        "-o", tmp_path / "f32.npz")  # fmt: skip
    run("synth", "--family", "cell", "--mode", "neighbors", "--n", "200", "--input-size", "24", "--genes", "6",
        "--dtype", "fp16", "-o", tmp_path / "f16.npz")  # fmt: skip
    f32, f16 = load_bundle(tmp_path / "f32.npz"), load_bundle(tmp_path / "f16.npz")
    assert f32["neighbors"].dtype == np.float32
    assert f16["neighbors"].dtype == np.float16 and f16["target"].dtype == np.float32
    assert (tmp_path / "f16.npz").stat().st_size < 0.6 * (tmp_path / "f32.npz").stat().st_size
    run("train", "--data", tmp_path / "f32.npz", "--family", "cell", "--mode", "neighbors", "--epochs", "1",
        "--n-ensemble", "3", "--no-progress", "-o", tmp_path / "run")  # fmt: skip
    ckpt = tmp_path / "run" / "model.safetensors"
    run("export", ckpt, "--io", "fp16", "--precision", "fp16", "-o", tmp_path / "m16.onnx")
    run("infer", tmp_path / "m16.onnx", "-i", tmp_path / "f16.npz", "-o", tmp_path / "p16.npy")
    run("infer", ckpt, "-i", tmp_path / "f32.npz", "-o", tmp_path / "p32.npy")  # eager fp32, fp32 features
    p16, p32 = np.load(tmp_path / "p16.npy"), np.load(tmp_path / "p32.npy")
    tol = TOLERANCES["fp16"]
    assert np.abs(p16 - p32).max() <= tol.atol + tol.rtol * np.abs(p32).max()
    # An fp32 graph takes fp16 features too (each batch is cast).
    run("infer", ckpt, "-i", tmp_path / "f16.npz", "-o", tmp_path / "p32from16.npy")
    assert np.abs(np.load(tmp_path / "p32from16.npy") - p32).max() <= tol.atol + tol.rtol * np.abs(p32).max()


def test_values_beyond_fp16_range_are_refused():
    with pytest.raises(InputError, match="beyond float16's range"):
        cast_features({"spot": np.array([[1e5]], np.float32)}, "fp16")
    with pytest.raises(InputError, match="unknown feature dtype 'int8'"):
        cast_features({}, "int8")


@pytest.mark.parametrize("precision, graph", [("fp32", "eager"), ("fp32", "export"), ("fp16", "eager")])
def test_the_torch_runners_take_fp16_features_as_they_are_and_cast_them_on_the_device(precision, graph):
    import deepspot
    from deepspot.runtime.stream import predict
    from deepspot.runtime.torch_runner import TorchRunner

    model = deepspot.create_model("spot", "subspot_neighbors", n_ensemble=3, random_seed=0, input_size=16,
                                  output_size=5, phi2rho_size=8)  # fmt: skip
    rng = np.random.default_rng(0)
    feed = {"spot": rng.normal(size=(40, 1, 16)), "subspot": rng.normal(size=(40, 4, 16)),
            "neighbors": rng.normal(size=(40, 3, 16))}  # fmt: skip
    f16 = {k: v.astype(np.float16) for k, v in feed.items()}
    with TorchRunner(model, precision=precision, graph=graph, io="fp16") as r16, \
            TorchRunner(model, precision=precision, graph=graph) as r32:  # fmt: skip
        assert {s.dtype for s in r16.get_input_metadata().values()} == {"float16"}
        # fp16 -> fp32 is exact, so the same model on the same values gives the same bits.
        expected = r32.infer({k: v.astype(np.float32) for k, v in f16.items()})["expression"]
        np.testing.assert_array_equal(r16.infer(f16)["expression"], expected)
        # Streamed through the pipeline's ring, the batches stay fp16 on the host (half the bytes to copy).
        seen = []
        infer = r16.infer_impl
        r16.infer_impl = lambda batch: seen.append({a.dtype for a in batch.values()}) or infer(batch)
        np.testing.assert_array_equal(predict(r16, f16, 16, pipelined=True), expected)
        assert seen and all(dtypes == {np.dtype(np.float16)} for dtypes in seen)


def test_a_feature_dtype_asked_of_a_graph_must_be_the_one_it_was_exported_with(tmp_path):
    import deepspot
    from deepspot.errors import ConfigError
    from deepspot.export import export_onnx
    from deepspot.runtime import RunnerOptions, load_runner

    model = deepspot.create_model("spot", "spot", n_ensemble=2, random_seed=0, input_size=8, output_size=3,
                                  phi2rho_size=4)  # fmt: skip
    export_onnx(model, tmp_path / "m32.onnx", validate=False)
    export_onnx(model, tmp_path / "m16.onnx", io_dtype="fp16", precision="fp16", validate=False)
    with pytest.raises(ConfigError, match=r"takes fp32 features .*export it with io_dtype='fp16' to take"):
        load_runner(tmp_path / "m32.onnx", "ort-cpu", RunnerOptions(io="fp16"))
    with pytest.raises(ConfigError, match=r"takes fp16 features"):
        load_runner(tmp_path / "m16.onnx", "ort-cpu", RunnerOptions(io="fp32"))
    with pytest.raises(ConfigError, match="unknown feature dtype 'fp8'"):
        load_runner(tmp_path / "m16.onnx", "ort-cpu", RunnerOptions(io="fp8"))
    assert load_runner(tmp_path / "m16.onnx", "ort-cpu", RunnerOptions(io="fp16")) is not None
    assert load_runner(model, "torch", RunnerOptions(io="fp16")).get_input_metadata()["spot"].dtype == "float16"


def test_infer_sends_an_fp16_bundle_to_torch_cuda_as_fp16(monkeypatch, tmp_path):
    import importlib

    infer_module = importlib.import_module("deepspot.runtime.infer")  # the module (the package exports a function)
    asked = []

    class Stop(Exception):
        pass

    def load_runner(model, backend, options, allow_fallback):
        asked.append((backend, options.io))
        raise Stop

    monkeypatch.setattr(infer_module, "load_runner", load_runner)
    for backend in ("torch-cuda", "torch"):
        with pytest.raises(Stop):
            infer_module.ModelSession("m.safetensors", backend).dense(64, {}, fp16_features=True)
    with pytest.raises(Stop):
        infer_module.ModelSession("m.safetensors", "torch-cuda").dense(64, {}, fp16_features=False)
    # A cohort's session is not fitted to its first slide: a later fp32 slide would be cast to fp16.
    with pytest.raises(Stop):
        infer_module.ModelSession("m.safetensors", "torch-cuda", shared=True).dense(64, {}, fp16_features=True)
    # torch-cuda: the bus carries fp16; on the CPU there is no bus, and the prefetch thread casts as before.
    assert asked == [("torch-cuda", "fp16"), ("torch", None), ("torch-cuda", None), ("torch-cuda", None)]


@pytest.mark.parametrize("layout", ["dense", "index", "indexed"])
def test_fp32_values_beyond_fp16s_range_are_refused_by_an_fp16_input_graph(tmp_path, layout):
    """The check before the run is against the graph's input type: a value an fp32 bundle holds that the cast to
    float16 would make inf is refused naming its row, never written as an inf or NaN prediction."""
    from deepspot.data import save_bundle, synth_bundle, synth_slide
    from deepspot.export import export_onnx
    from deepspot.export.indexed import export_indexed
    from deepspot.factory import create_model

    model = create_model("cell", "neighbors", input_size=8, output_size=3, phi2rho_size=4, n_ensemble=3,
                         random_seed=0).eval()  # fmt: skip
    if layout == "dense":
        arrays = synth_bundle("cell", "neighbors", 20, 8, 3, seed=0, n_neighbors=4)
        arrays["neighbors"][7, 2, 3] = 1e5  # finite in float32, inf in float16
        name = "neighbors"
    else:  # an index bundle, through the per-item graph (bags gathered per batch) or the indexed export
        arrays = synth_slide("cell", 20, 8, 4, seed=0)
        arrays["cell"][7, 3] = -1e5
        name = "cell"
    bundle = save_bundle(tmp_path / "b.npz", arrays)
    graph = tmp_path / "m16"
    if layout == "indexed":
        export_indexed(model, graph, precision="fp16", io_dtype="fp16")
    else:
        graph = graph.with_suffix(".onnx")
        export_onnx(model, graph, precision="fp16", io_dtype="fp16")
    dense = [] if layout == "indexed" else ["--layout", "dense"]
    result = CliRunner().invoke(app, ["infer", str(graph), "-i", str(bundle), "-o", str(tmp_path / "p.npy"), *dense])
    assert result.exit_code == 2, result.output
    assert f"{name!r} holds a value beyond float16's range (it would become inf) in row 7" in result.output
    assert not (tmp_path / "p.npy").exists()
    # The same values through an fp32 graph are fine.
    export_onnx(model, tmp_path / "m32.onnx")
    run("infer", tmp_path / "m32.onnx", "-i", bundle, "-o", tmp_path / "p32.npy", "--layout", "dense")
    assert np.isfinite(np.load(tmp_path / "p32.npy")).all()


def test_inputs_made_per_batch_are_staged_at_the_graphs_dtype(tmp_path, monkeypatch):
    """The pipeline's staging buffers take the graph's dtype for the inputs ``prepare`` makes (the neighbour bags of
    an index bundle), not float32: an fp16 graph's device buffers, bound to those, would otherwise get the wrong type
    (and twice the bytes would cross the bus)."""
    from deepspot.data import synth_slide
    from deepspot.export import export_onnx
    from deepspot.factory import create_model
    from deepspot.modes import get_mode
    from deepspot.runtime import load_runner, predict
    from deepspot.runtime import pipeline as pl
    from deepspot.runtime.indexed import dense_from_index

    model = create_model("cell", "neighbors", input_size=8, output_size=3, phi2rho_size=4, n_ensemble=3,
                         random_seed=0).eval()  # fmt: skip
    export_onnx(model, tmp_path / "m16.onnx", precision="fp16", io_dtype="fp16")
    inputs, gather = dense_from_index(synth_slide("cell", 40, 8, 4, seed=0), get_mode("cell", "neighbors"))
    staged = []
    submit = pl.HostAdapter.submit

    def spy(self, slot):
        staged.append({k: v.dtype for k, v in slot.feed.items()})
        return submit(self, slot)

    monkeypatch.setattr(pl.HostAdapter, "submit", spy)
    with load_runner(tmp_path / "m16.onnx", "ort-cpu") as r:
        piped = predict(r, inputs, 16, prepare=gather, pipelined=True)
        plain = predict(r, inputs, 16, prepare=gather, pipelined=False)
    assert len(staged) == 3 and all(s == {"cell": np.float16, "neighbors": np.float16} for s in staged), staged
    np.testing.assert_array_equal(piped, plain)


@pytest.mark.parametrize("how", ["onnx-fp16-weights", "torch-fp16", "indexed-fp16", "pipelined"])
def test_a_model_that_overflows_is_an_error_not_nan_predictions(tmp_path, how):
    """Inputs within float16's range can still overflow inside an fp16 model: the predictions are checked as they
    are written, and a NaN or inf is one line naming the item, with nothing written."""
    from deepspot import save
    from deepspot.data import save_bundle, synth_bundle, synth_slide
    from deepspot.export import export_onnx
    from deepspot.export.indexed import export_indexed
    from deepspot.factory import create_model
    from deepspot.runtime.stream import NonFinitePrediction

    model = create_model("cell", "neighbors", input_size=8, output_size=3, phi2rho_size=4, n_ensemble=3,
                         random_seed=0).eval()  # fmt: skip
    arrays = synth_slide("cell", 40, 8, 4, seed=0) if how == "indexed-fp16" else synth_bundle(
        "cell", "neighbors", 40, 8, 3, seed=0, n_neighbors=4)  # fmt: skip
    arrays["cell"][29] *= 6e4  # within float16's range (65504), but Phi's products are not
    bundle = save_bundle(tmp_path / "b.npz", arrays)
    if how == "pipelined":  # the GPU pipeline's writer, run on the host: the check rides on the threads' copies
        from deepspot.runtime import load_runner, predict

        export_onnx(model, tmp_path / "m16.onnx", precision="fp16")
        inputs = {"cell": arrays["cell"][:, None], "neighbors": arrays["neighbors"]}
        with load_runner(tmp_path / "m16.onnx", "ort-cpu") as r, pytest.raises(NonFinitePrediction, match="item 29"):
            predict(r, inputs, 16, pipelined=True, check_finite=True)
        return
    if how == "onnx-fp16-weights":
        export_onnx(model, tmp_path / "m16.onnx", precision="fp16")
        args = [tmp_path / "m16.onnx"]
    elif how == "indexed-fp16":
        export_indexed(model, tmp_path / "m16", precision="fp16")
        args = [tmp_path / "m16"]
    else:
        args = [save(model, tmp_path / "m.safetensors"), "--precision", "fp16"]
    result = CliRunner().invoke(app, ["infer", *map(str, args), "-i", str(bundle), "-o", str(tmp_path / "p.npz")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    first = 29  # in the indexed slide, the first item with 29 among its neighbours comes first
    if "neighbor_index" in arrays:
        first = min(29, int(np.nonzero((arrays["neighbor_index"] == 29).any(axis=1))[0].min()))
    assert len(lines) == 1 and f"the prediction for item {first} is not finite" in lines[0], result.output
    assert not (tmp_path / "p.npz").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
