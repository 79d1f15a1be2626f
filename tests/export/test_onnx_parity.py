"""Every family x mode x {optimised, not}: parity on onnxruntime CPU over batch and bag sizes, and a sound graph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from deepspot.export import EXPORT_SPECS, build_export_module, read_model_metadata, session_from_onnx
from deepspot.export.median import network_ops

E = 10  # the tiny models' ensemble size (conftest)


def _cases():
    """One case per registry entry and optimisation; a mode pooled with ``agg`` once per aggregation."""
    cases = []
    for key, spec in sorted(EXPORT_SPECS.items()):
        aggs = ["max", "mean", "sum"] if any(b.pool == "agg" for b in spec.mode.bags) else [None]
        for agg in aggs:
            for optimize in (True, False):
                kwargs = {} if agg is None else {"agg_neighbors": agg}
                case_id = f"{key}-{agg or 'fixed'}-{'opt' if optimize else 'plain'}"
                cases.append(pytest.param(spec, optimize, kwargs, id=case_id))
    return cases


CASES = _cases()


@pytest.mark.parametrize("spec, optimize, kwargs", CASES)
def test_parity_over_batch_and_bag_sizes(exported, spec, optimize, kwargs):
    model, result = exported(spec.mode.family, spec.mode.name, optimize, **kwargs)
    assert result.validation is not None and result.validation.passed
    session = session_from_onnx(result.path)  # onnxruntime CPU, threads that do not spin between runs
    tolerance = spec.tolerance("fp32")
    for batch in (1, 7, 64):
        for bag_size in (1, 3, 12):
            inputs = spec.example_inputs(model.input_size, batch, bag_size, seed=batch * 100 + bag_size)
            with torch.no_grad():
                expected = model(**inputs).numpy()
            actual = session.run(["expression"], {k: v.numpy() for k, v in inputs.items()})[0]
            assert actual.shape == (batch, model.output_size)
            err = np.abs(actual.astype(np.float64) - expected).max()
            limit = tolerance.limit(np.abs(expected).max())
            assert err <= limit, f"batch {batch}, bag {bag_size}: max abs error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("spec, optimize, kwargs", CASES)
def test_graph_is_standard_checked_and_shaped(exported, spec, optimize, kwargs):
    model, result = exported(spec.mode.family, spec.mode.name, optimize, **kwargs)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node), "custom ops"

    # Inputs and output: names in spec order, named dynamic axes, fixed feature and gene axes.
    def dims(value_info):
        return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)

    assert [i.name for i in proto.graph.input] == list(spec.input_names)
    assert {i.name: dims(i) for i in proto.graph.input} == spec.input_shapes(model.input_size)
    assert [dims(o) for o in inferred.graph.output] == [("batch", model.output_size)]
    assert [o.name for o in proto.graph.output] == ["expression"]

    ops = Counter(node.op_type for node in proto.graph.node)
    assert "TopK" not in ops and "Dropout" not in ops
    n_bags = len(spec.mode.bags)
    assert ops["Min"] + ops["Max"] == n_bags * network_ops(E)
    if optimize:
        # One product per bag for the whole Phi ensemble, one linear layer for the whole Rho ensemble.
        assert ops["MatMul"] + ops["Gemm"] == n_bags + 1
        assert ops["Relu"] == n_bags  # Phi's ReLU, once per bag after the median; Rho's identity ReLU is gone
    else:
        assert ops["MatMul"] + ops["Gemm"] == E * n_bags + E
        assert ops["Relu"] == E * n_bags + E


@pytest.mark.parametrize("spec, optimize, kwargs", CASES[::2])
def test_metadata_describes_the_export(exported, spec, optimize, kwargs):
    model, result = exported(spec.mode.family, spec.mode.name, optimize, **kwargs)
    meta = read_model_metadata(result.path)
    assert meta["family"] == spec.mode.family and meta["mode"] == spec.mode.name
    assert meta["mode_reference"] == spec.mode.reference
    assert meta["config"] == model.config
    assert meta["genes"] == model.genes
    assert meta["precision"] == "fp32" and meta["io_dtype"] == "fp32"
    assert meta["scaler_folded"] is False and meta["optimize"] is optimize
    assert meta["scaler"] == model.scaler.to_dict()
    assert meta["opset"] == 17
    assert meta["source"] == "in-memory" and meta["source_sha256_of"] == "state_dict"
    assert len(meta["source_sha256"]) == 64
    import deepspot

    assert meta["deepspot_version"] == deepspot.__version__


@pytest.mark.parametrize("spec", list(EXPORT_SPECS.values()), ids=list(EXPORT_SPECS))
@pytest.mark.parametrize("optimize", [True, False])
def test_export_module_matches_the_model_in_torch(make_model, spec, optimize):
    model = make_model(spec.mode.family, spec.mode.name)
    module = build_export_module(model, optimize=optimize)
    inputs = spec.example_inputs(model.input_size, 9, 4, seed=5)
    with torch.no_grad():
        expected = model(**inputs)
        by_name = module(**inputs)
        by_position = module(*inputs.values())
    assert torch.equal(by_name, by_position)
    limit = spec.tolerance("fp32").limit(expected.abs().max())
    assert (by_name - expected).abs().max() <= limit
    if not optimize:
        # The same layers run in the same order: only the median's formulation differs, and it is exact.
        assert torch.equal(by_name, expected)


def test_nan_input_propagates_like_torch(exported):
    spec = EXPORT_SPECS["spot/subspot_neighbors"]
    model, result = exported("spot", "subspot_neighbors", True)
    inputs = spec.example_inputs(model.input_size, 4, 3, seed=2)
    inputs["neighbors"][1, 2, 5] = float("nan")
    with torch.no_grad():
        expected = model(**inputs).numpy()
    session = session_from_onnx(result.path)
    actual = session.run(["expression"], {k: v.numpy() for k, v in inputs.items()})[0]
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    assert np.isnan(actual[1]).all() and not np.isnan(np.delete(actual, 1, axis=0)).any()
