"""The export-friendly lower median equals torch.median: values, ties, even and odd E, NaN; in torch and in ONNX."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from deepspot.export.median import (
    batcher_sorting_network,
    lower_median,
    lower_median_of,
    network_ops,
    selection_network,
    sorting_network_candidates,
)

SIZES = list(range(1, 13))


def _run_network(network, values):
    v = list(values)
    for i, j in network:
        if v[i] > v[j]:
            v[i], v[j] = v[j], v[i]
    return v


@pytest.mark.parametrize("n", SIZES)
def test_candidate_sorting_networks_sort_every_zero_one_input(n):
    # 0-1 principle: a comparator network sorts every input iff it sorts every 0/1 input.
    for network in sorting_network_candidates(n):
        assert all(i < j < n for i, j in network)
        for bits in itertools.product((0, 1), repeat=n):
            assert _run_network(network, bits) == sorted(bits), (n, bits)


@pytest.mark.parametrize("n", SIZES)
def test_pruned_network_selects_the_lower_median_of_every_zero_one_input(n):
    # The 0-1 principle holds for selection too (comparators commute with monotone maps).
    k = (n - 1) // 2
    net = selection_network(n)
    for bits in itertools.product((0, 1), repeat=n):
        v = list(bits)
        for c in net:
            lo, hi = min(v[c.i], v[c.j]), max(v[c.i], v[c.j])
            if c.need_min:
                v[c.i] = lo
            if c.need_max:
                v[c.j] = hi
        assert v[k] == sorted(bits)[k], (n, bits)


def test_pruning_saves_ops_and_picks_the_cheaper_candidate():
    assert network_ops(1) == 0
    assert network_ops(2) == 1  # min(a, b): the lower median of two
    assert network_ops(10) < 2 * len(batcher_sorting_network(10))
    assert network_ops(10) == 43


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_random_values_equal_torch_median(n, dim):
    g = torch.Generator().manual_seed(n)
    shape = [4, 5, 6]
    shape[dim] = n
    x = torch.randn(*shape, generator=g)
    expected = torch.median(x, dim=dim).values
    assert torch.equal(lower_median(x, dim), expected)


@pytest.mark.parametrize("n", SIZES)
def test_constructed_ties_equal_torch_median(n):
    # Values from a tiny set, so most columns have ties at and around the median; every tie pattern over {0, 1, 2}
    # for n <= 6, a random sample of them beyond.
    if n <= 6:
        rows = torch.tensor(list(itertools.product((0.0, 1.0, 2.0), repeat=n)))  # (3^n, n)
    else:
        rows = torch.randint(0, 3, (4000, n), generator=torch.Generator().manual_seed(n)).float()
    expected = torch.median(rows, dim=1).values
    assert torch.equal(lower_median(rows, 1), expected)


@pytest.mark.parametrize("n", [2, 4, 6, 10, 12])
def test_even_sizes_take_the_lower_middle_value_not_the_mean(n):
    x = torch.arange(n, dtype=torch.float32).flip(0)[None, :]  # n-1, ..., 0
    assert lower_median(x, 1).item() == (n - 1) // 2
    assert lower_median(x, 1).item() != (n - 1) / 2


@pytest.mark.parametrize("n", SIZES)
def test_nan_anywhere_gives_nan_like_torch(n):
    g = torch.Generator().manual_seed(100 + n)
    x = torch.randn(64, n, 3, generator=g)
    mask = torch.rand(64, n, 3, generator=g) < 0.1
    x[mask] = float("nan")
    x[0, :, 0] = float("nan")  # a column that is all NaN
    x[1, 0, 1] = float("nan")  # exactly one NaN, at every position over the tests
    x[2, :, 2] = torch.tensor([float("inf"), -float("inf")] * n)[:n]  # infinities order like numbers
    expected = torch.median(x, dim=1).values
    actual = lower_median(x, 1)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.isnan(expected).any()
    finite = ~torch.isnan(expected)
    assert torch.equal(actual[finite], expected[finite])


def test_single_nan_at_each_position_reaches_the_output():
    n = 10
    x = torch.randn(n, n)
    x[torch.arange(n), torch.arange(n)] = float("nan")  # row r has its NaN at position r
    assert torch.isnan(lower_median(x, 1)).all()
    assert torch.isnan(torch.median(x, dim=1).values).all()


def test_lower_median_of_accepts_a_list_and_keeps_inputs():
    values = [torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0])]
    before = [v.clone() for v in values]
    assert lower_median_of(values).item() == 2.0
    assert all(torch.equal(a, b) for a, b in zip(values, before))


class _Median(torch.nn.Module):
    def forward(self, x):
        return lower_median(x, 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter's notice
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 9, 10, 11, 12])
def test_onnx_graph_equals_torch_median_on_onnxruntime_cpu(n, dtype):
    """The same formulation as ONNX Min/Max on onnxruntime's CPU provider: exact, NaN propagated, no TopK."""
    import onnx
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float16
    example = torch.randn(2, n, 3).to(torch_dtype)
    torch.onnx.export(
        _Median(),
        (example,),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["m"],
        dynamic_axes={"x": {0: "rows", 2: "cols"}},
    )
    model = onnx.load_from_string(buffer.getvalue())
    assert {node.op_type for node in model.graph.node} <= {"Min", "Max", "Split", "Squeeze", "Constant", "Identity"}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buffer.getvalue(), sess_options=options, providers=["CPUExecutionProvider"])

    g = torch.Generator().manual_seed(n)
    x = torch.randint(-3, 4, (500, n, 7), generator=g).float()  # many ties
    x[torch.rand(x.shape, generator=g) < 0.05] = float("nan")
    x = x.to(torch_dtype)
    expected = torch.median(x.float(), dim=1).values.numpy().astype(dtype)
    actual = session.run(["m"], {"x": x.numpy()})[0]
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(actual[~np.isnan(actual)], expected[~np.isnan(expected)])


def test_rejects_an_empty_ensemble_and_bad_positions():
    with pytest.raises(ValueError):
        selection_network(0)
    with pytest.raises(ValueError):
        selection_network(3, 3)


def test_torch_compile_traces_the_export_module_in_one_graph():
    """``--compile`` on torch-cuda fuses the median's Min/Max passes only if dynamo sees the whole forward: no graph
    break (``min(key=)`` broke it) and no re-tracing of the network's construction (``functools.cache``)."""
    import warnings

    import deepspot
    from deepspot.export import build_export_module

    explain = getattr(getattr(torch, "_dynamo", None), "explain", None)
    if explain is None:
        pytest.skip("this PyTorch has no torch._dynamo.explain")
    model = deepspot.create_model("spot", "subspot_neighbors", n_ensemble=10, random_seed=0, input_size=16,
                                  output_size=4, phi2rho_size=8)  # fmt: skip
    module = build_export_module(model).eval()
    x = {"spot": torch.randn(4, 1, 16), "subspot": torch.randn(4, 9, 16), "neighbors": torch.randn(4, 6, 16)}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = explain(module)(**x)
    assert report.graph_break_count == 0 and report.graph_count == 1
    assert not [w for w in seen if "lru_cache" in str(w.message)]
