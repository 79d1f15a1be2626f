"""DeepSpot and DeepCell: parity with the reference, initialisation, shapes and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepspot import create_model
from deepspot.cell import DeepCell
from deepspot.errors import ConfigError
from deepspot.layers import lower_median
from deepspot.modes import MODES, get_mode
from deepspot.spot import DeepSpot

from _reference import reference_data, reference_model


@pytest.mark.parametrize("family", ["spot", "cell"])
def test_forward_matches_reference_outputs(family):
    model = reference_model(family)
    data = reference_data(family)
    inputs = {n: torch.from_numpy(data[n]) for n in model.mode.input_names}
    with torch.no_grad():
        pred = model(**inputs).numpy()
    np.testing.assert_allclose(pred, data["prediction"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.inverse_transform(pred), data["prediction_inverse"], rtol=0, atol=1e-6)
    # The reference's positional list form gives the same result.
    with torch.no_grad():
        pred_list = model([inputs[n] for n in model.mode.input_names]).numpy()
    np.testing.assert_array_equal(pred, pred_list)


def test_seed_gives_reference_initial_parameters(reference_dir):
    traj = np.load(reference_dir / "trajectory_spot_subspot_neighbors_seed2024.npz")
    model = DeepSpot(input_size=12, output_size=5, phi2rho_size=8, random_seed=2024)
    state = model.state_dict()
    assert sorted(state) == sorted(k[len("init/") :] for k in traj.files if k.startswith("init/"))
    for key, value in state.items():
        np.testing.assert_array_equal(value.numpy(), traj[f"init/{key}"], err_msg=key)


def test_state_dict_keys_are_the_reference_keys():
    spot = DeepSpot(8, 3, phi2rho_size=4, n_ensemble=2, spot_context="spot_neighbors")
    assert list(spot.state_dict()) == [
        "phi_spot.0.model.0.weight", "phi_spot.0.model.0.bias", "phi_spot.1.model.0.weight", "phi_spot.1.model.0.bias",
        "rho.0.model.2.weight", "rho.0.model.2.bias", "rho.1.model.2.weight", "rho.1.model.2.bias",
    ]  # fmt: skip
    assert spot.rho[0].model[2].in_features == 8  # m = 2 for spot_neighbors
    cell = DeepCell(8, 3, phi2rho_size=4, n_ensemble=3, cell_context="cell")
    assert "phi_cell.2.model.0.weight" in cell.state_dict()
    assert cell.rho[0].model[2].in_features == 4


def test_ensemble_sizes_and_explicit_zero_dropout():
    m = DeepSpot(8, 3, phi2rho_size=4, n_ensemble=4, n_ensemble_phi=3, n_ensemble_rho=5, p=0.5, p_phi=0.0)
    assert len(m.phi_spot) == 3 and len(m.rho) == 5
    assert m.p_phi == 0.0 and m.p_rho == 0.5  # only None means unset: an explicit 0 is kept
    assert m.phi_spot[0].model[1].p == 0.0 and m.rho[0].model[0].p == 0.5


def _inputs(mode, batch, bag, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {b.name: torch.randn(batch, 1 if b.single else bag, d, generator=g) for b in mode.bags}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.key)
@pytest.mark.parametrize("bag", [1, 40])
def test_shapes_in_every_mode(mode, bag):
    model = create_model(mode.family, mode.name, input_size=6, output_size=4, phi2rho_size=5, n_ensemble=3).eval()
    with torch.no_grad():
        out = model(**_inputs(mode, 7, bag, 6))
    assert out.shape == (7, 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.key)
def test_forward_equals_hand_written_computation(mode):
    model = create_model(mode.family, mode.name, input_size=6, output_size=4, phi2rho_size=5, n_ensemble=4).eval()
    x = _inputs(mode, 5, 3, 6, seed=1)
    with torch.no_grad():
        out = model(**x)
        parts = []
        for b in mode.bags:
            h = torch.stack([torch.relu(p.model[0](x[b.name])) for p in model.phi], dim=2)  # (B, T, E, H)
            h = h.sort(dim=2).values[:, :, (len(model.phi) - 1) // 2]  # lower median
            op = model.pool_of(b.name)
            parts.append({"sum": h.sum(1), "max": h.amax(1), "mean": h.mean(1), "none": h.flatten(1)}[op])
        z = torch.cat(parts, dim=1)
        expected = torch.stack([r.model[2](z) for r in model.rho]).mean(0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_cell_aggregations_differ():
    x = _inputs(get_mode("cell", "neighbors"), 4, 5, 6)
    outs = {}
    for agg in ("max", "mean", "sum"):
        m = DeepCell(6, 3, phi2rho_size=4, n_ensemble=3, agg_neighbors=agg, random_seed=1).eval()
        with torch.no_grad():
            outs[agg] = m(**x)
    assert not torch.allclose(outs["max"], outs["mean"]) and not torch.allclose(outs["mean"], outs["sum"])


def test_lower_median_semantics():
    x = torch.tensor([[1.0, 4.0, 2.0, 3.0], [5.0, 5.0, 1.0, 1.0], [0.0, float("nan"), 1.0, 2.0]])
    med = lower_median(x, dim=1)
    assert med[0] == 2.0  # even count: the lower middle value, not the mean 2.5
    assert med[1] == 1.0
    assert torch.isnan(med[2])


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x: {"spot": x["spot"], "subspot": x["subspot"]}, "missing input 'neighbors'"),
        (lambda x: {**x, "spot": x["spot"][:, 0]}, "input 'spot' must have shape (B, 1, 6)"),
        (lambda x: {**x, "subspot": x["subspot"][..., :5]}, "input 'subspot' has 5 features, expected 6"),
        (lambda x: {**x, "neighbors": x["neighbors"][:3]}, "input 'neighbors' has batch size 3"),
        (lambda x: {**x, "spot": x["subspot"]}, "input 'spot' must have shape (B, 1, 6)"),
        (lambda x: {**x, "cell": x["spot"]}, "unexpected input 'cell'"),
    ],
)
def test_bad_inputs_raise_named_value_errors(bad, message):
    mode = get_mode("spot", "subspot_neighbors")
    model = DeepSpot(6, 3, phi2rho_size=4, n_ensemble=2).eval()
    with pytest.raises(ValueError) as err:
        model(**bad(_inputs(mode, 4, 3, 6)))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "cast, message",
    [
        (lambda t: t.double(), "input 'spot' is torch.float64, the model's weights are torch.float32: pass spot.to("),
        (lambda t: t.half(), "input 'spot' is torch.float16"),
        (lambda t: t.int(), "input 'spot' must be floating point, got torch.int32"),
        (lambda t: t.numpy(), "input 'spot' must be a torch.Tensor, got ndarray (torch.from_numpy(a) makes one)"),
    ],
)
def test_inputs_of_another_dtype_raise_named_value_errors(cast, message):
    # torch.from_numpy of NumPy's default float64 gave "mat1 and mat2 must have the same dtype" from deep in Linear.
    mode = get_mode("spot", "subspot_neighbors")
    model = DeepSpot(6, 3, phi2rho_size=4, n_ensemble=2).eval()
    x = _inputs(mode, 4, 3, 6)
    with pytest.raises(ValueError) as err:
        model(**{**x, "spot": cast(x["spot"])})
    assert message in str(err.value)
    with pytest.raises(ValueError, match=r"keyword arguments, model\(\*\*bags\)"):
        model(x)  # a dict positionally
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast casts for the model: allowed
        assert model(**{k: v.to(torch.bfloat16) for k, v in x.items()}).shape == (4, 3)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.key)
def test_an_empty_batch_gives_no_rows(mode):
    # As the ONNX graphs do: (0, G), not "cannot reshape tensor of 0 elements".
    cls = DeepSpot if mode.family == "spot" else DeepCell
    model = cls(6, 3, phi2rho_size=4, n_ensemble=2, **{f"{mode.family}_context": mode.reference}).eval()
    with torch.no_grad():
        assert model(**_inputs(mode, 0, 3, 6)).shape == (0, 3)


def test_positional_inputs_are_checked():
    model = DeepSpot(6, 3, phi2rho_size=4, n_ensemble=2).eval()
    with pytest.raises(ValueError, match="takes 3 bags"):
        model([torch.zeros(2, 1, 6)])
    with pytest.raises(ValueError, match="got one tensor"):
        model(torch.zeros(2, 1, 6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spot_context": "spot_everything"}, "unknown spot mode"),
        ({"loss_func": "mae"}, "unknown spot loss"),
        ({"n_ensemble": 0}, "n_ensemble must be a positive integer"),
        ({"p": 1.5}, "p must lie in"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DeepSpot(6, 3, **kwargs)


def test_bad_cell_aggregation():
    with pytest.raises(ConfigError, match="unknown agg_neighbors"):
        DeepCell(6, 3, agg_neighbors="median")


def test_short_and_reference_mode_names_are_the_same_mode():
    a = DeepSpot(6, 3, n_ensemble=2, phi2rho_size=4, spot_context="neighbors")
    b = DeepSpot(6, 3, n_ensemble=2, phi2rho_size=4, spot_context="spot_neighbors")
    assert a.mode == b.mode and a.config["spot_context"] == "spot_neighbors"
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
