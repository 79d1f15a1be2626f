"""Export options and failure modes: precision, io dtype, folded scaler, opset, wrong inputs, validation, metadata."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from deepspot import checkpoint
from deepspot.errors import CheckpointError, ConfigError, DeepSpotError
from deepspot.export import (
    EXPORT_SPECS,
    ExportValidationError,
    KernelUnavailableError,
    build_export_module,
    export_onnx,
    fold_rho_ensemble,
    model_info,
    read_model_metadata,
    state_dict_hash,
    validate_onnx,
)
from deepspot.export import exporter as exporter_module


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# -- precision ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(EXPORT_SPECS.values()), ids=list(EXPORT_SPECS))
@pytest.mark.parametrize("io_dtype", [None, "fp16"])
def test_fp16_meets_its_tolerance_on_cpu(make_model, run_onnx, tmp_path, spec, io_dtype):
    model = make_model(spec.mode.family, spec.mode.name)
    try:
        result = export_onnx(model, tmp_path / "m.onnx", precision="fp16", io_dtype=io_dtype)
    except KernelUnavailableError as e:
        pytest.skip(f"onnxruntime's CPU provider has no fp16 kernel for {e.op}")
    assert result.validation.passed
    io = np.float16 if io_dtype == "fp16" else np.float32
    proto = onnx.load(str(result.path))
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    for batch, bag in [(1, 12), (64, 3)]:
        inputs = spec.example_inputs(model.input_size, batch, bag, seed=batch + bag)
        feed = {k: v.numpy().astype(io) for k, v in inputs.items()}
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v.astype(np.float32)) for k, v in feed.items()}).numpy()
        actual = run_onnx(result.path, feed)
        assert actual.dtype == io
        limit = spec.tolerance("fp16").limit(np.abs(expected).max())
        assert np.abs(actual.astype(np.float64) - expected).max() <= limit


def test_bf16_is_refused_with_the_op_when_cpu_cannot_run_it(make_model, tmp_path):
    model = make_model("spot", "subspot_neighbors")
    try:
        result = export_onnx(model, tmp_path / "m.onnx", precision="bf16")
    except KernelUnavailableError as e:
        assert e.op and e.op in str(e) and "bf16" in str(e) and "validate=False" in str(e) and "--" not in str(e)
        assert _leftovers(tmp_path) == []
    else:  # a future onnxruntime with bf16 CPU kernels: then it must validate
        assert result.validation.passed


def test_bf16_without_validation_writes_bf16_weights(make_model, tmp_path):
    model = make_model("cell", "neighbors")
    result = export_onnx(model, tmp_path / "m.onnx", precision="bf16", validate=False)
    assert result.validation is None
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_model_metadata(result.path)["precision"] == "bf16"


# -- the folded Rho -----------------------------------------------------------------------------------------------
def test_folded_rho_is_the_mean_of_the_ensemble_within_fp32_rounding(make_model):
    model = make_model("spot", "subspot_neighbors")
    weight, bias = fold_rho_ensemble(model.rho)
    assert weight.dtype == torch.float64
    expected_w = torch.stack([r.model[2].weight.double() for r in model.rho]).mean(0)
    torch.testing.assert_close(weight, expected_w, rtol=1e-15, atol=0)
    # At a wider layer the float32 error of folding stays at rounding level.
    h = torch.rand(256, 3 * 64)
    rhos = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(), torch.nn.Linear(3 * 64, 300)) for _ in range(10)
    )
    rhos = [type("R", (), {"model": r})() for r in rhos]
    w, b = fold_rho_ensemble(rhos)
    with torch.no_grad():
        reference = torch.stack([r.model(h) for r in rhos], 1).mean(1)
        folded = h @ w.float().T + b.float()
    assert (folded - reference).abs().max() <= 1e-5 * (1 + reference.abs().max())


# -- scaler -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("optimize", [True, False])
def test_fold_scaler_outputs_the_original_scale(make_model, run_onnx, tmp_path, precision, optimize):
    model = make_model("spot", "neighbors")
    spec = EXPORT_SPECS["spot/neighbors"]
    result = export_onnx(model, tmp_path / "m.onnx", precision=precision, optimize=optimize, fold_scaler=True)
    inputs = spec.example_inputs(model.input_size, 5, 4)
    with torch.no_grad():
        expected = model.inverse_transform(model(**inputs)).numpy()
    actual = run_onnx(result.path, {k: v.numpy() for k, v in inputs.items()})
    limit = spec.tolerance(precision).limit(np.abs(expected).max())
    assert np.abs(actual - expected).max() <= limit
    assert read_model_metadata(result.path)["scaler_folded"] is True


def test_fold_scaler_without_a_scaler_is_refused(make_model, tmp_path):
    model = make_model("cell", "cell", scaler=False)
    with pytest.raises(ConfigError, match="no scaler"):
        export_onnx(model, tmp_path / "m.onnx", fold_scaler=True)
    assert _leftovers(tmp_path) == []


# -- refusals before any work -------------------------------------------------------------------------------------
def test_a_different_mode_is_refused_naming_the_models_mode(make_model, tmp_path):
    model = make_model("spot", "subspot_neighbors")
    with pytest.raises(ConfigError, match=r"built for mode 'subspot_neighbors'") as info:
        export_onnx(model, tmp_path / "m.onnx", mode="neighbors")
    assert "\n" not in str(info.value)
    assert _leftovers(tmp_path) == []
    # Its own mode, by short or reference name, is fine.
    export_onnx(model, tmp_path / "m.onnx", mode="spot_subspot_neighbors", validate=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "tissue"}, "unknown spot mode"),
        ({"precision": "int8"}, "unknown precision"),
        ({"io_dtype": "fp16"}, "io_dtype='fp16' needs precision='fp16'"),
        ({"opset": 16}, "opset 16 is not supported"),
        ({"opset": 99}, "opset 99 is not supported"),
    ],
)
def test_invalid_options_are_refused(make_model, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        export_onnx(make_model("spot", "spot"), tmp_path / "m.onnx", **kwargs)
    assert _leftovers(tmp_path) == []


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_onnx(tmp_path / "absent.safetensors", tmp_path / "m.onnx")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError):
        export_onnx(garbage, tmp_path / "m.onnx")
    assert _leftovers(tmp_path) == ["garbage.safetensors"]


def test_unwritable_outputs(make_model, tmp_path):
    model = make_model("spot", "spot")
    with pytest.raises(DeepSpotError, match="does not exist"):
        export_onnx(model, tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(ConfigError, match="is a folder"):
        export_onnx(model, tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DeepSpotError):
        export_onnx(model, a_file / "m.onnx")


def test_opset_20_exports_and_validates(make_model, tmp_path):
    result = export_onnx(make_model("cell", "neighbors"), tmp_path / "m.onnx", opset=20)
    assert result.validation.passed and result.opset == 20
    proto = onnx.load(str(result.path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [20]


# -- validation and atomic writing --------------------------------------------------------------------------------
def test_failed_validation_leaves_nothing_and_states_error_and_tolerance(make_model, tmp_path, monkeypatch):
    model = make_model("spot", "subspot_neighbors")
    other = make_model("spot", "subspot_neighbors", seed=1)
    real_build = exporter_module.build_export_module
    # Export a graph of different weights than the model that validation compares against.
    monkeypatch.setattr(exporter_module, "build_export_module", lambda m, **kw: real_build(other, **kw))
    output = tmp_path / "m.onnx"
    with pytest.raises(ExportValidationError) as info:
        export_onnx(model, output)
    message = str(info.value)
    assert "max abs error" in message and "> tolerance" in message and "1e-05 x (1 + max|reference|)" in message
    assert "batch 1, bag 1" in message and "batch 7, bag 5" in message  # every failure, not just the first
    assert "\n" not in message
    assert _leftovers(tmp_path) == []


def test_a_failed_export_keeps_an_existing_file_untouched(make_model, tmp_path, monkeypatch):
    output = tmp_path / "m.onnx"
    output.write_bytes(b"previous")
    monkeypatch.setattr(exporter_module, "check_graph", lambda proto: (_ for _ in ()).throw(DeepSpotError("boom")))
    with pytest.raises(DeepSpotError, match="boom"):
        export_onnx(make_model("spot", "spot"), output)
    assert output.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == ["m.onnx"]


def test_written_file_gets_default_permissions_not_the_temp_files(make_model, tmp_path):
    umask = os.umask(0o022)
    try:
        result = export_onnx(make_model("spot", "spot"), tmp_path / "m.onnx", validate=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o644


def test_export_replaces_an_existing_file(make_model, tmp_path):
    output = tmp_path / "m.onnx"
    output.write_bytes(b"previous")
    export_onnx(make_model("spot", "spot"), output)
    assert model_info(output).inputs[0].name == "spot"
    assert _leftovers(tmp_path) == ["m.onnx"]


def test_validation_report_collects_names_shapes_and_values(make_model, tmp_path):
    model = make_model("cell", "neighbors")
    result = export_onnx(model, tmp_path / "m.onnx")
    good = validate_onnx(result.path, model)
    assert good.passed and len(good.results) == 2 and good.max_abs_err < 1e-5
    assert "passed" in good.summary() and "expression" in good.table()

    other = make_model("cell", "neighbors", seed=3)
    bad = validate_onnx(result.path, other)
    assert not bad.passed and len(bad.failures) == 2 and "FAILED" in bad.summary()

    wrong_family = make_model("spot", "neighbors")
    names = validate_onnx(result.path, wrong_family)
    assert names.failures == ["inputs are ['cell', 'neighbors'], expected ['spot', 'neighbors']"]


# -- metadata and sources -----------------------------------------------------------------------------------------
def test_checkpoint_source_is_hashed_and_named(make_model, tmp_path):
    model = make_model("cell", "neighbors", agg_neighbors="mean")
    path = checkpoint.save(model, tmp_path / "model.safetensors")
    result = export_onnx(path, tmp_path / "m.onnx")
    meta = read_model_metadata(result.path)
    assert meta["source"] == "model.safetensors" and meta["source_sha256_of"] == "file"
    assert meta["source_sha256"] == checkpoint.file_hash(path)
    assert meta["config"]["agg_neighbors"] == "mean" and meta["genes"] == model.genes
    assert meta["pools"] == {"cell": "none", "neighbors": "mean"}


def test_state_dict_hash_identifies_weights(make_model):
    a, b = make_model("spot", "spot"), make_model("spot", "spot")
    assert state_dict_hash(a) == state_dict_hash(b)
    with torch.no_grad():
        b.rho[0].model[2].bias[0] += 1e-6
    assert state_dict_hash(a) != state_dict_hash(b)


def test_model_info_reports_dynamic_axes(make_model, tmp_path):
    result = export_onnx(make_model("spot", "subspot_neighbors"), tmp_path / "m.onnx")
    info = model_info(result.path)
    assert [t.name for t in info.inputs] == ["spot", "subspot", "neighbors"]
    assert info.inputs[0].dynamic_axes == {0: "batch"}
    assert info.inputs[1].dynamic_axes == {0: "batch", 1: "n_subspot"}
    assert info.inputs[2].shape == ("batch", "n_neighbors", 16)
    assert info.outputs[0].shape == ("batch", 5) and info.opset == 17 and info.is_deepspot
    text = info.format()
    assert "subspot: float32 (batch, n_subspot, 16)  dynamic axes: 0: batch, 1: n_subspot" in text
    assert "5 genes [GENE0" in text


def test_model_info_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        model_info(tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        read_model_metadata(bad)


# -- the module the runtime uses ----------------------------------------------------------------------------------
def test_build_export_module_leaves_the_model_alone(make_model):
    model = make_model("spot", "subspot_neighbors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = build_export_module(model, precision="fp16", optimize=False)
    assert all(p.dtype == torch.float16 for p in module.parameters())
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="built for mode"):
        build_export_module(model, mode="spot")


def test_import_needs_neither_onnxruntime_nor_training_nor_cli():
    code = (
        "import sys, deepspot.export; "
        "bad = [m for m in ('onnxruntime', 'deepspot.train', 'deepspot.cli') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
