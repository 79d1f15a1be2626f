"""Training: the reference's path bit for bit, reproducibility, learning, early stopping and the loss plot."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from _reference import ULPS_ACROSS_FAMILIES, assert_same_training, cpu_vendor, trajectory_fixture, ulp_distance
from deepspot import create_model
from deepspot.checkpoint import save
from deepspot.data import synth_bundle
from deepspot.errors import ConfigError, InputError
from deepspot.modes import get_mode
from deepspot.spot import DeepSpot
from deepspot.train import TrainConfig, fit, loss_curves, plot_loss, smooth_curve

QUIET = dict(progress=False)


def test_follows_the_reference_trajectory_exactly(reference_dir, record_property):
    # Bit for bit against the reference's run on this CPU family; within a few ulps on any other x86 CPU.
    path, exact, checked = trajectory_fixture(cpu_vendor())
    record_property("reference_trajectory", checked)
    traj = np.load(path)
    model = DeepSpot(input_size=12, output_size=5, phi2rho_size=8, random_seed=2024)
    inputs = {k: traj[k] for k in ("spot", "subspot", "neighbors")}
    history = fit(model, inputs, traj["target"], TrainConfig(epochs=3, batch_size=16, shuffle=False, **QUIET))
    assert_same_training(np.asarray(history["train_loss"]), traj["training_loss"], exact, f"losses vs {checked}")
    for key, value in model.state_dict().items():
        assert_same_training(value.numpy(), traj[f"final/{key}"], exact, f"{key} vs {checked}")


def test_follows_lightning_with_shuffling_and_validation(reference_dir, record_property):
    # tests/data/lightning_trajectory.npz: the same run through Lightning 2.6's Trainer, shuffled, with a validation
    # loader (see make_lightning_trajectory.py). The permutation seed and each validation loader's iterator seed are
    # draws from torch's generator; one missed draw changes every later dropout mask.
    lit = np.load(Path(__file__).parent / "data" / "lightning_trajectory.npz")
    exact = cpu_vendor() is not None and str(lit["made_on"]).startswith(cpu_vendor())
    record_property("lightning_trajectory", f"{'bit for bit' if exact else 'within ulps'} ({lit['made_on']})")
    traj = np.load(trajectory_fixture("AuthenticAMD")[0])
    model = DeepSpot(input_size=12, output_size=5, phi2rho_size=8, random_seed=2024)
    inputs = {k: traj[k] for k in ("spot", "subspot", "neighbors")}
    val = {k: lit[f"val_{k}"] for k in ("spot", "subspot", "neighbors")}
    history = fit(model, inputs, traj["target"], TrainConfig(epochs=3, batch_size=16, shuffle=True, **QUIET), val,
                  lit["val_target"])  # fmt: skip
    # The file was made on one CPU family only. On another, the BLAS's last bits differ (2 ulps for the reference's
    # own pair of runs); 64 ulps leaves room for that, while one missed draw moves the losses by millions of ulps.
    ulps = 64
    assert_same_training(np.float32(history["train_loss"]), lit["train_loss"], exact, "training losses", ulps)
    assert_same_training(np.float32(history["val_loss"]), lit["val_loss"], exact, "validation losses", ulps)
    for key, value in model.state_dict().items():
        assert_same_training(value.numpy(), lit[f"final/{key}"], exact, key, ulps)
    # The epoch means are Lightning's logged values (what its EarlyStopping compares): weighted by batch size, the
    # validation set's 20 items coming in batches of 16 and 4. Lightning sums in float32.
    np.testing.assert_allclose(history["epoch_val_loss"], lit["epoch_val_loss"], rtol=1e-5)
    np.testing.assert_allclose(history["epoch_train_loss"], lit["epoch_train_loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "vendor, name, exact",
    [
        ("AuthenticAMD", "trajectory_spot_subspot_neighbors_seed2024.npz", True),
        ("GenuineIntel", "trajectory_spot_subspot_neighbors_seed2024_intel.npz", True),
        ("HygonGenuine", "trajectory_spot_subspot_neighbors_seed2024.npz", False),
        (None, "trajectory_spot_subspot_neighbors_seed2024.npz", False),
    ],
)
def test_each_cpu_family_gets_its_own_trajectory(reference_dir, vendor, name, exact):
    path, is_exact, checked = trajectory_fixture(vendor)
    assert path.name == name and is_exact == exact and path.is_file()
    assert ("bit for bit" in checked) == exact


def test_the_two_families_runs_agree_within_a_few_ulps_but_not_bit_for_bit(reference_dir):
    amd = np.load(trajectory_fixture("AuthenticAMD")[0])
    intel = np.load(trajectory_fixture("GenuineIntel")[0])
    assert "GenuineIntel" in str(intel["made_on"])
    finals = [k for k in amd.files if k.startswith("final/")]
    distances = [ulp_distance(amd[k], intel[k]) for k in finals] + [ulp_distance(amd["training_loss"], intel["training_loss"])]
    assert 0 < max(distances) <= ULPS_ACROSS_FAMILIES  # the tolerance is needed, and it suffices
    with pytest.raises(AssertionError, match="ulps from the reference"):
        assert_same_training(np.float32(1.0), np.float32(1.0) + np.float32(1e-6), False, "one value")


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    assert cpu_vendor(str(info)) == "GenuineIntel"
    assert cpu_vendor(str(tmp_path / "none")) is None


def _small(family="spot", mode="subspot_neighbors", n=200, seed=3):
    data = synth_bundle(family, mode, n, input_size=8, genes=4, seed=seed, n_subspots=3, n_neighbors=3)
    m = get_mode(family, mode)
    return {b.name: data[b.name] for b in m.bags}, data["target"]


def _train(tmp_path, name, shuffle=True, **cfg):
    inputs, target = _small()
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
    fit(model, inputs, target, TrainConfig(epochs=2, batch_size=32, shuffle=shuffle, val_fraction=0.2, **QUIET, **cfg))
    path = save(model, tmp_path / f"{name}.safetensors")
    return model, path.read_bytes()


def test_same_seed_gives_identical_checkpoints(tmp_path):
    a, bytes_a = _train(tmp_path, "a")
    b, bytes_b = _train(tmp_path, "b")
    assert bytes_a == bytes_b
    assert a.history["train_loss"] == b.history["train_loss"]
    assert len(a.history["val_loss"]) > 0


def test_shuffling_changes_the_path():
    inputs, target = _small()
    losses = []
    for shuffle in (True, False):
        model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
        losses.append(fit(model, inputs, target, TrainConfig(epochs=1, batch_size=32, shuffle=shuffle, **QUIET)))
    assert losses[0]["train_loss"] != losses[1]["train_loss"]


@pytest.mark.parametrize("family, mode", [("spot", "subspot_neighbors"), ("cell", "neighbors")])
def test_learns_synthetic_signal_well_below_the_mean_predictor(family, mode):
    data = synth_bundle(family, mode, 1500, input_size=16, genes=8, seed=1, n_subspots=4, n_neighbors=4)
    m = get_mode(family, mode)
    inputs = {b.name: data[b.name] for b in m.bags}
    model = create_model(family, mode, input_size=16, output_size=8, phi2rho_size=32, n_ensemble=3, lr=3e-3)
    cfg = TrainConfig(epochs=12, batch_size=64, val_fraction=0.2, normalize=True, **QUIET)
    history = fit(model, inputs, data["target"], cfg)
    # With normalised targets, predicting the (training) mean scores a validation MSE of about 1.
    assert history["epoch_val_loss"][-1] < 0.6 * history["epoch_val_loss"][0]
    assert history["epoch_val_loss"][-1] < 0.6
    assert model.scaler is not None and model.scaler.offset.shape == (8,)


def test_early_stopping_stops_on_a_plateau():
    inputs, target = _small()
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3, lr=0)
    cfg = TrainConfig(epochs=20, batch_size=64, val_fraction=0.2, early_stopping=True, patience=2, **QUIET)
    history = fit(model, inputs, target, cfg)
    # lr = 0: the validation loss never improves after the first epoch, so training stops after 1 + patience.
    assert history["epochs"] == 3
    assert history["stopped"].startswith("early_stopping")


def test_separate_validation_data():
    inputs, target = _small()
    v_inputs, v_target = _small(n=50, seed=9)
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
    history = fit(model, inputs, target, TrainConfig(epochs=2, batch_size=64, **QUIET), v_inputs, v_target)
    assert len(history["val_loss"]) == 2  # one batch per epoch
    assert history["steps_per_epoch"] == 4


def test_bad_training_inputs():
    inputs, target = _small()
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
    with pytest.raises(InputError, match=r"target must have shape \(N, 4\)"):
        fit(model, inputs, target[:, :3], TrainConfig(**QUIET))
    bad = dict(inputs, subspot=inputs["subspot"].copy())
    bad["subspot"][17, 1, 2] = np.nan
    with pytest.raises(InputError, match="'subspot' holds a non-finite value in row 17"):
        fit(model, bad, target, TrainConfig(**QUIET))
    with pytest.raises(ConfigError, match="needs validation data"):
        fit(model, inputs, target, TrainConfig(early_stopping=True, **QUIET))
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_validation_data_is_checked_before_training():
    # Each used to surface only after a training epoch (a misleading "diverged, try a lower --lr", a shape error from
    # the loss), or not at all (a short val_target evaluated on part of the data; val_target alone ignored).
    inputs, target = _small(n=40)
    cfg = TrainConfig(epochs=1, batch_size=16, **QUIET)
    nan_target = target.copy()
    nan_target[5, 2] = np.nan
    nan_spot = dict(inputs, spot=inputs["spot"].copy())
    nan_spot["spot"][3] = np.inf
    empty = {k: v[:0] for k, v in inputs.items()}
    cases = [
        (dict(val_inputs=inputs, val_target=nan_target), InputError, "validation 'target' holds a non-finite .* row 5"),
        (dict(val_inputs=nan_spot, val_target=target), InputError, "validation 'spot' holds a non-finite .* row 3"),
        (dict(val_inputs=empty, val_target=target[:0]), InputError, "the validation data holds no items"),
        (dict(val_inputs=inputs, val_target=target[:10]), InputError, "validation inputs and target have different"),
        (dict(val_inputs=inputs, val_target=target[:, :3]), InputError, r"validation target must have shape \(N, 4\)"),
        (dict(val_inputs=inputs), ConfigError, "needs both val_inputs and val_target"),
        (dict(val_target=target), ConfigError, "needs both val_inputs and val_target"),
    ]
    for kwargs, error, message in cases:
        model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=message):
            fit(model, inputs, target, cfg, **kwargs)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any step
    with pytest.raises(ConfigError, match="not both"):
        fit(model, inputs, target, TrainConfig(val_fraction=0.2, **QUIET), inputs, target)


def test_empty_training_data_is_refused():
    inputs, target = _small(n=40)
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
    with pytest.raises(InputError, match="the training data holds no items"):
        fit(model, {k: v[:0] for k, v in inputs.items()}, target[:0], TrainConfig(**QUIET))


def test_values_that_float32_cannot_hold_are_named():
    # A float64 target beyond float32's range was reported as "non-finite" after a RuntimeWarning; a target that is
    # not numbers was a ValueError traceback.
    inputs, target = _small(n=40)
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
    big = target.astype(np.float64)
    big[6, 1] = 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="'target' holds a value beyond float32's range in row 6"):
            fit(model, inputs, big, TrainConfig(**QUIET))
    text = target.astype(str)
    text[2, 0] = "n/a"
    with pytest.raises(InputError, match="'target' must hold numbers: could not convert"):
        fit(model, inputs, text, TrainConfig(**QUIET))
    bundle = dict(inputs, target=target, barcode=np.array([f"s{i}" for i in range(40)]))  # a whole bundle as inputs
    with pytest.raises(InputError, match="unexpected input 'target': mode 'spot_subspot_neighbors' takes spot, sub"):
        fit(model, bundle, target, TrainConfig(**QUIET))


def test_only_the_spot_bag_may_be_one_tile_per_item():
    # A 2-D sub-spot or neighbour array was silently read as a bag of one tile; a bundle refuses it, and so does fit.
    inputs, target = _small(n=40)
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=4, phi2rho_size=6, n_ensemble=3)
    flat = dict(inputs, subspot=inputs["subspot"].mean(axis=1))
    with pytest.raises(InputError, match=r"'subspot' must have 3 axes \(N, bag, D\), got shape \(40, 8\)"):
        fit(model, flat, target, TrainConfig(**QUIET))
    with pytest.raises(InputError, match=r"validation 'neighbors' must have 3 axes"):
        fit(model, inputs, target, TrainConfig(**QUIET), dict(inputs, neighbors=inputs["neighbors"][:, 0]), target)
    one_tile = dict(inputs, spot=inputs["spot"].reshape(40, 8))  # (N, D) for the spot bag, as in a bundle
    history = fit(model, one_tile, target, TrainConfig(epochs=1, batch_size=64, **QUIET))
    assert len(history["train_loss"]) == 1


def test_smoothing_and_curves():
    np.testing.assert_allclose(smooth_curve([1.0, 0.0, 0.0]), [1.0, 0.8, 0.64])
    curves = loss_curves({"train_loss": [4.0, 3.0, 2.0, 1.0], "val_loss": [3.0, 1.0]})
    # Validation steps sit at 0 and len(train)//len(val)+1 = 3, interpolated onto training steps 1..4.
    np.testing.assert_allclose(curves["val"], [3 - 2 / 3, 3 - 4 / 3, 1.0, 1.0])


def test_plot_is_a_png(tmp_path):
    path = plot_loss({"train_loss": [3.0, 2.0, 1.5], "val_loss": [2.5]}, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.get_num_threads() >= 1
