"""The fused Phi computed in column blocks (cache-sized products, each with its own median): same values, every mode."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from deepspot.errors import ConfigError
from deepspot.export import EXPORT_SPECS, build_export_module, export_onnx, session_from_onnx
from deepspot.export.graph import PHI_BLOCK_WIDTH, FusedPhi, fuse_phi_ensemble, phi_blocks
from deepspot.export.median import network_ops
from deepspot.factory import create_model

D, H, G, E = 24, 2 * PHI_BLOCK_WIDTH, 7, 10  # H = 256: two blocks of 128 columns


def _model(family: str, mode: str, seed: int = 0):
    model = create_model(family, mode, input_size=D, output_size=G, phi2rho_size=H, n_ensemble=E, random_seed=seed)
    with torch.no_grad():
        for phi in model.phi:  # larger biases: members cross each other, so the median picks differently per column
            phi.model[0].bias.normal_(0.0, 0.5)
    return model.eval()


def test_block_count_follows_the_width():
    assert phi_blocks(512) == 4 and phi_blocks(1024) == 8 and phi_blocks(256) == 2
    assert phi_blocks(128) == 1 and phi_blocks(32) == 1  # one block is the whole product
    assert phi_blocks(640 + 1) == 1  # not a multiple of the block width: one product


def test_blocks_compute_what_one_product_computes():
    model = _model("spot", "subspot_neighbors")
    weight, bias = fuse_phi_ensemble(model.phi)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    one, four = FusedPhi(weight, bias, E, blocks=1), FusedPhi(weight, bias, E, blocks=4)
    assert one.blocks == 1 and four.blocks == 4 and len(four.weights) == 4
    with torch.no_grad():
        expected = torch.relu(torch.stack([phi.model[0](x) for phi in model.phi]).median(dim=0).values)
        torch.testing.assert_close(four(x), one(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(four(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="equal blocks"):
        FusedPhi(weight, bias, E, blocks=3)  # 256 columns do not split in three


@pytest.mark.parametrize("key", sorted(EXPORT_SPECS), ids=sorted(EXPORT_SPECS))
def test_blocked_export_matches_the_model(tmp_path, key):
    spec = EXPORT_SPECS[key]
    model = _model(spec.mode.family, spec.mode.name)
    module = build_export_module(model)
    assert module.phi.blocks == 2
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.validation is not None and result.validation.passed

    proto = onnx.load(str(result.path))
    ops = Counter(node.op_type for node in proto.graph.node)
    n_bags = len(spec.mode.bags)
    assert ops["Gemm"] + ops["MatMul"] == 2 * n_bags + 1  # two Phi blocks per bag, one folded Rho
    assert ops["Min"] + ops["Max"] == 2 * n_bags * network_ops(E)  # a median network per block

    session = session_from_onnx(result.path)
    tolerance = spec.tolerance("fp32")
    for batch, bag_size in ((1, 1), (6, 5)):
        inputs = spec.example_inputs(D, batch, bag_size, seed=batch + bag_size)
        with torch.no_grad():
            expected = model(**inputs).numpy()
        actual = session.run(["expression"], {k: v.numpy() for k, v in inputs.items()})[0]
        err = np.abs(actual.astype(np.float64) - expected).max()
        assert err <= tolerance.limit(np.abs(expected).max()), f"batch {batch}, bag {bag_size}: error {err:.3g}"


@pytest.mark.parametrize("family, mode", [("spot", "subspot_neighbors"), ("cell", "neighbors")])
def test_blocked_indexed_export_matches_the_model(tmp_path, family, mode):
    from deepspot.data import densify
    from deepspot.export.indexed import export_indexed
    from deepspot.runtime.indexed import load_pipeline, predict_indexed

    model = _model(family, mode)
    folder = export_indexed(model, tmp_path / "indexed")
    rng = np.random.default_rng(3)
    n, own = 40, model.mode.bags[0].name
    arrays = {own: rng.standard_normal((n, D), dtype=np.float32), "neighbor_index": rng.integers(-1, n, (n, 6))}
    bags = {own: arrays[own][:, None], "neighbors": densify(arrays[own], arrays["neighbor_index"])}
    if "subspot" in model.mode.input_names:
        arrays["subspot"] = bags["subspot"] = rng.standard_normal((n, 3, D), dtype=np.float32)
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bags.items()}).numpy()
    for table in ("memory", "device"):  # the host gather, and the head that gathers in its graph
        with load_pipeline(folder, "ort-cpu", batch_size=16, table=table) as pipeline:
            got, location = predict_indexed(pipeline, arrays, 16)
        assert location == table
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * (1 + np.abs(expected).max()))
