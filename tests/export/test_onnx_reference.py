"""Both reference fixtures, exported from their .ckpt weights, reproduce the reference's predictions in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from deepspot.export import export_onnx, get_spec, read_model_metadata


def _feed(model, arrays, dtype=np.float32):
    return {name: arrays[name].astype(dtype) for name in model.mode.input_names}


@pytest.mark.parametrize("optimize", [True, False])
def test_prediction_within_fp32_tolerance(reference, tmp_path, run_onnx, optimize):
    name, model, arrays = reference
    result = export_onnx(model, tmp_path / f"{name}.onnx", optimize=optimize)
    assert result.validation.passed
    expected = arrays["prediction"]
    actual = run_onnx(result.path, _feed(model, arrays))
    limit = get_spec(model.family, model.mode.name).tolerance("fp32").limit(np.abs(expected).max())
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= limit


@pytest.mark.parametrize("optimize", [True, False])
def test_folded_scaler_gives_the_inverse_transformed_prediction(reference, tmp_path, run_onnx, optimize):
    name, model, arrays = reference
    result = export_onnx(model, tmp_path / f"{name}.onnx", fold_scaler=True, optimize=optimize)
    expected = arrays["prediction_inverse"]
    actual = run_onnx(result.path, _feed(model, arrays))
    limit = get_spec(model.family, model.mode.name).tolerance("fp32").limit(np.abs(expected).max())
    assert np.abs(actual - expected).max() <= limit
    meta = read_model_metadata(result.path)
    assert meta["scaler_folded"] is True
    np.testing.assert_array_equal(meta["scaler"]["offset"], model.scaler.offset)
    np.testing.assert_array_equal(meta["scaler"]["scale"], model.scaler.scale)


def test_unfolded_output_plus_metadata_scaler_gives_the_inverse(reference, tmp_path, run_onnx):
    # What a runtime does without the checkpoint: run the graph, then x * scale + offset from the metadata.
    name, model, arrays = reference
    result = export_onnx(model, tmp_path / f"{name}.onnx")
    meta = read_model_metadata(result.path)
    y = run_onnx(result.path, _feed(model, arrays)).astype(np.float64)
    y = y * np.asarray(meta["scaler"]["scale"]) + np.asarray(meta["scaler"]["offset"])
    expected = arrays["prediction_inverse"]
    assert np.abs(y - expected).max() <= 1e-5 * (1 + np.abs(expected).max())


@pytest.mark.parametrize("io_dtype", [None, "fp16"])
def test_fp16_within_its_tolerance(reference, tmp_path, run_onnx, io_dtype):
    name, model, arrays = reference
    result = export_onnx(model, tmp_path / f"{name}.onnx", precision="fp16", io_dtype=io_dtype)
    expected = arrays["prediction"]
    dtype = np.float16 if io_dtype == "fp16" else np.float32
    actual = run_onnx(result.path, _feed(model, arrays, dtype))
    assert actual.dtype == dtype
    tolerance = get_spec(model.family, model.mode.name).tolerance("fp16")
    assert tolerance.rel == 5e-3
    assert np.abs(actual.astype(np.float64) - expected).max() <= tolerance.limit(np.abs(expected).max())
