"""Importing the reference's files: outputs equal the reference's, hyperparameters map as the reference reads them."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
import torch
import yaml

import deepspot
from deepspot.errors import CheckpointError
from deepspot.importer import find_hparams, import_reference, read_genes, scaler_from_reference
from deepspot.reference import Record, _record_class, safe_torch_load

NAMES = ("spot_subspot_neighbors", "cell_neighbors_max")


@pytest.mark.parametrize("suffix", [".pkl", ".ckpt"])
@pytest.mark.parametrize("name", NAMES)
def test_outputs_equal_the_reference(reference_dir, name, suffix, ref):
    case = ref.case(name)
    model = import_reference(reference_dir / f"{name}{suffix}")
    pred = ref.predict(model, case)
    assert pred.dtype == np.float32
    assert ref.max_abs(pred, case["prediction"]) <= ref.tol
    assert ref.max_abs(model.inverse_transform(pred), case["prediction_inverse"]) <= ref.tol
    assert model.family == ("spot" if name.startswith("spot") else "cell")
    assert not model.training


@pytest.mark.parametrize("name", NAMES)
def test_deepspot_load_imports_on_the_fly(reference_dir, name, ref):
    case = ref.case(name)
    for suffix in (".pkl", ".ckpt"):
        model = deepspot.load(reference_dir / f"{name}{suffix}")
        assert ref.max_abs(ref.predict(model, case), case["prediction"]) <= ref.tol


def test_pickle_keeps_history_and_hyperparameters(reference_dir, ref):
    case = ref.case("cell_neighbors_max")
    model = import_reference(reference_dir / "cell_neighbors_max.pkl")
    np.testing.assert_allclose(model.history["train_loss"], case["training_loss"], rtol=0, atol=1e-7)
    assert model.history["val_loss"] == []
    assert model.config["loss_func"] == "huber" and model.config["agg_neighbors"] == "max"
    assert model.config["phi2rho_size"] == 10 and model.mode.name == "neighbors"
    assert model.scaler.kind == "standard" and model.scaler.n_features == 6


@pytest.mark.parametrize("name", NAMES)
def test_imported_checkpoint_round_trips(reference_dir, tmp_path, name, ref):
    case = ref.case(name)
    model = import_reference(reference_dir / f"{name}.pkl")
    out = deepspot.save(model, tmp_path / "model.safetensors")
    again = deepspot.load(out)
    pred = ref.predict(again, case)
    assert ref.max_abs(pred, case["prediction"]) <= ref.tol
    assert ref.max_abs(again.inverse_transform(pred), case["prediction_inverse"]) <= ref.tol
    assert again.history == model.history


def _plain_state_dict(reference_dir, name, folder, stem="weights"):
    ckpt = safe_torch_load(reference_dir / f"{name}.ckpt")
    path = folder / f"{stem}.pt"
    torch.save({k: v.detach().clone() for k, v in ckpt["state_dict"].items()}, path)
    return path


@pytest.mark.parametrize("name", NAMES)
def test_plain_state_dict_with_the_yaml_beside_it(reference_dir, tmp_path, name, ref):
    case = ref.case(name)
    weights = _plain_state_dict(reference_dir, name, tmp_path)
    shutil.copy(reference_dir / f"{name}.yaml", tmp_path / "weights.yaml")
    model = import_reference(weights)
    assert ref.max_abs(ref.predict(model, case), case["prediction"]) <= ref.tol
    assert model.scaler is None  # the YAML writes the scaler as text, without its numbers


def test_plain_state_dict_with_explicit_hparams(reference_dir, tmp_path, ref):
    case = ref.case("spot_subspot_neighbors")
    weights = _plain_state_dict(reference_dir, "spot_subspot_neighbors", tmp_path)
    model = import_reference(weights, hparams=reference_dir / "spot_subspot_neighbors.yaml")
    assert ref.max_abs(ref.predict(model, case), case["prediction"]) <= ref.tol
    as_dict = yaml.safe_load((reference_dir / "spot_subspot_neighbors.yaml").read_text())
    model = import_reference(weights, hparams=as_dict)
    assert ref.max_abs(ref.predict(model, case), case["prediction"]) <= ref.tol


def test_find_hparams_order(tmp_path):
    weights = tmp_path / "final_model.pkl"
    weights.write_bytes(b"")
    assert find_hparams(weights) is None
    (tmp_path / "top_param_overall.yaml").write_text("a: 1\n")
    assert find_hparams(weights).name == "top_param_overall.yaml"  # the only YAML, and the published name
    (tmp_path / "other.yaml").write_text("a: 1\n")
    assert find_hparams(weights).name == "top_param_overall.yaml"
    (tmp_path / "hparams.yaml").write_text("a: 1\n")
    assert find_hparams(weights).name == "hparams.yaml"
    (tmp_path / "final_model.yaml").write_text("a: 1\n")
    assert find_hparams(weights).name == "final_model.yaml"
    (tmp_path / "hparams.yaml").unlink()
    (tmp_path / "top_param_overall.yaml").unlink()
    (tmp_path / "final_model.yaml").unlink()
    (tmp_path / "again.yml").write_text("a: 1\n")
    assert find_hparams(weights) is None  # two unrelated YAMLs: ambiguous


def test_zero_means_unset_as_in_the_reference(reference_dir, tmp_path, ref):
    # The reference reads n_ensemble_phi with `x or default`: a stored 0 built n_ensemble Phi networks.
    case = ref.case("spot_subspot_neighbors")
    model = import_reference(
        reference_dir / "spot_subspot_neighbors.pkl", hparams={"n_ensemble_phi": 0, "p_rho": 0, "scaler": "ignored"}
    )
    assert model.config["n_ensemble_phi"] is None and model.config["p_rho"] is None
    assert ref.max_abs(ref.predict(model, case), case["prediction"]) <= ref.tol
    assert model.scaler is not None  # text in place of a scaler does not hide the file's fitted one


def test_genes_from_the_reference_csv(reference_dir, tmp_path):
    csv = tmp_path / "info_highly_variable_genes.csv"
    rows = [f"G{i},{'True' if i % 2 == 0 else 'False'},{i}" for i in range(22)]
    csv.write_text("gene_name,isPredicted,highly_variable_rank\n" + "\n".join(rows) + "\n")
    genes = read_genes(csv)
    assert genes == [f"G{i}" for i in range(0, 22, 2)]
    model = import_reference(reference_dir / "spot_subspot_neighbors.pkl", genes=csv)
    assert model.genes == genes
    txt = tmp_path / "genes.txt"
    txt.write_text("\n".join(genes[:5]) + "\n")
    with pytest.raises(CheckpointError, match="5 gene names for 11 outputs"):
        import_reference(reference_dir / "spot_subspot_neighbors.pkl", genes=txt)


def _rewrite_pickle(src, dst, replacements):
    """Copy a torch zip file, renaming globals in its pickle (protocol 2 writes them as text lines)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                for old, new in replacements.items():
                    data = data.replace(old, new)
            zout.writestr(info.filename, data)


def test_old_numpy_lightning_and_module_paths(reference_dir, tmp_path, ref):
    legacy = tmp_path / "final_model.pkl"
    _rewrite_pickle(
        reference_dir / "spot_subspot_neighbors.pkl",
        legacy,
        {
            b"cnumpy._core.multiarray\n": b"cnumpy.core.multiarray\n",
            b"clightning.fabric.utilities.data\n": b"cpytorch_lightning.utilities.parsing\n",
            b"cdeepspot.spot.model\n": b"cdeepspot.model\n",
            b"cdeepspot.spot.loss\n": b"cdeepspot.loss\n",
        },
    )
    raw = zipfile.ZipFile(legacy).read("spot_subspot_neighbors/data.pkl")
    assert b"numpy.core.multiarray" in raw and b"pytorch_lightning" in raw and b"numpy._core" not in raw
    case = ref.case("spot_subspot_neighbors")
    model = import_reference(legacy)
    assert ref.max_abs(ref.predict(model, case), case["prediction"]) <= ref.tol
    assert ref.max_abs(model.inverse_transform(ref.predict(model, case)), case["prediction_inverse"]) <= ref.tol


def _scaler_record(name, **state):
    rec = _record_class("sklearn.preprocessing._data", name)()
    rec.__setstate__(state)
    return rec


def test_scalers_follow_scikit_learn():
    mean, scale = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    x = np.array([[1.0, -1.0]], dtype=np.float32)
    s = scaler_from_reference(_scaler_record("StandardScaler", mean_=mean, scale_=scale, n_features_in_=2))
    np.testing.assert_allclose(s.inverse_transform(x), x * scale + mean)
    s = scaler_from_reference(_scaler_record("RobustScaler", center_=mean, scale_=scale, n_features_in_=2))
    assert s.kind == "robust"
    np.testing.assert_allclose(s.inverse_transform(x), x * scale + mean)
    # with_mean=False: scikit-learn computes mean_ but does not add it back.
    s = scaler_from_reference(
        _scaler_record("StandardScaler", with_mean=False, mean_=mean, scale_=scale, n_features_in_=2)
    )
    np.testing.assert_allclose(s.inverse_transform(x), x * scale)
    assert scaler_from_reference("StandardScaler()") is None
    with pytest.raises(CheckpointError, match="unsupported scaler sklearn.preprocessing._data.MinMaxScaler"):
        scaler_from_reference(_scaler_record("MinMaxScaler", min_=mean), "w.pkl")
    assert isinstance(_scaler_record("StandardScaler"), Record)


def test_robust_scaler_in_a_checkpoint(reference_dir, tmp_path, ref):
    # A pickle whose scaler is a RobustScaler: re-point the StandardScaler's class and rename mean_ to center_
    # (a BINUNICODE string: opcode, 4-byte length, text).
    src = reference_dir / "spot_subspot_neighbors.pkl"
    dst = tmp_path / "robust.pkl"
    renames = {b"\nStandardScaler\n": b"\nRobustScaler\n", b"X\x05\x00\x00\x00mean_": b"X\x07\x00\x00\x00center_"}
    _rewrite_pickle(src, dst, renames)
    model = import_reference(dst)
    assert model.scaler.kind == "robust"
    case = ref.case("spot_subspot_neighbors")
    assert ref.max_abs(model.inverse_transform(ref.predict(model, case)), case["prediction_inverse"]) <= ref.tol


# -- bad input ----------------------------------------------------------------------------------------------------
def test_missing_hyperparameters(reference_dir, tmp_path):
    weights = _plain_state_dict(reference_dir, "spot_subspot_neighbors", tmp_path)
    with pytest.raises(CheckpointError, match=r"weights\.pt: holds no hyperparameters .* pass one with hparams$"):
        import_reference(weights)
    with pytest.raises(CheckpointError, match=r"weights\.pt: missing hyperparameters input_size"):
        import_reference(weights, hparams={"output_size": 11})


def test_shapes_disagreeing_with_hyperparameters(reference_dir, tmp_path):
    pkl = reference_dir / "spot_subspot_neighbors.pkl"
    with pytest.raises(CheckpointError, match=r"neighbors\.pkl: .*phi_spot\.0\.model\.0\.weight has shape"):
        import_reference(pkl, hparams={"phi2rho_size": 8})
    with pytest.raises(CheckpointError, match=r"spot_subspot_neighbors\.pkl: .*missing"):
        import_reference(pkl, hparams={"n_ensemble": 12})
    weights = _plain_state_dict(reference_dir, "cell_neighbors_max", tmp_path)
    bad = yaml.safe_load((reference_dir / "cell_neighbors_max.yaml").read_text())
    bad["input_size"] = 13
    (tmp_path / "weights.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(CheckpointError, match=r"weights\.pt: .* shape \(10, 12\), the hyperparameters give \(10, 13\)"):
        import_reference(weights)


def test_invalid_hyperparameter_values_name_the_file(reference_dir):
    with pytest.raises(CheckpointError, match=r"cell_neighbors_max\.ckpt: unknown cell loss 'nope'"):
        import_reference(reference_dir / "cell_neighbors_max.ckpt", hparams={"loss_func": "nope"})
    with pytest.raises(CheckpointError, match=r"cell_neighbors_max\.ckpt: unknown cell mode"):
        import_reference(reference_dir / "cell_neighbors_max.ckpt", hparams={"cell_context": "cell_subspot"})


def test_unreadable_hparams_yaml(reference_dir, tmp_path):
    bad = tmp_path / "h.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(CheckpointError, match=r"h\.yaml: expected a mapping"):
        import_reference(reference_dir / "cell_neighbors_max.pkl", hparams=bad)
    bad.write_text("a: [unclosed\n")
    with pytest.raises(CheckpointError, match=r"h\.yaml: not a readable YAML"):
        import_reference(reference_dir / "cell_neighbors_max.pkl", hparams=bad)
    with pytest.raises(CheckpointError, match="no such hyperparameter file"):
        import_reference(reference_dir / "cell_neighbors_max.pkl", hparams=tmp_path / "absent.yaml")


def test_state_dict_of_another_network(tmp_path):
    path = tmp_path / "resnet.pt"
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(2, 2)}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"resnet\.pt: not a DeepSpot or DeepCell state dict"):
        import_reference(path, hparams={"input_size": 2, "output_size": 2})
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pt: holds a dict, not a reference model"):
        import_reference(path)
