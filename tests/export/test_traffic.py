"""``traffic_per_item``: the bytes an unfused run of a graph moves per item (what bounds it where memory does)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deepspot.errors import CheckpointError
from deepspot.export.info import traffic_per_item


def _tiny(path):
    """x (B, 1, 8) -> Reshape (B, 8) -> Gemm with W (8, 4) -> Relu -> y (B, 4)."""
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 8], np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)  # fmt: skip
    return path


def test_each_node_reads_its_inputs_and_writes_its_outputs_views_are_free(tmp_path):
    path = _tiny(tmp_path / "tiny.onnx")
    batch = 16
    # Gemm reads flat (B x 8) and w (8 x 4, once per batch) and writes h (B x 4); Relu reads h and writes y.
    expected = (batch * 8 * 4 + 8 * 4 * 4 + batch * 4 * 4) + (batch * 4 * 4 * 2)
    assert traffic_per_item(path, batch, {}) == pytest.approx(expected / batch)
    assert traffic_per_item(path, 1024, {}) < traffic_per_item(path, 16, {})  # the weights are shared by the batch


def test_an_fp16_export_moves_fewer_bytes(tmp_path):
    import deepspot
    from deepspot.export import export_onnx

    model = deepspot.create_model("spot", "subspot_neighbors", n_ensemble=5, random_seed=0, input_size=32,
                                  output_size=16, phi2rho_size=16)  # fmt: skip
    export_onnx(model, tmp_path / "m32.onnx", validate=False)
    export_onnx(model, tmp_path / "m16.onnx", precision="fp16", validate=False)
    bags = {"subspot": 9, "neighbors": 6}
    t32, t16 = (traffic_per_item(tmp_path / f"m{p}.onnx", 256, bags) for p in ("32", "16"))
    # at least the features: 16 tiles x 32 fp32 values read by the first product
    assert 16 * 32 * 4 < t16 < t32


def test_a_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        traffic_per_item(tmp_path / "none.onnx", 8, {})
