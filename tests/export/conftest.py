"""Fixtures of the export tests: tiny models of every mode, the reference fixtures, a helper to run ONNX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deepspot.factory import create_model, model_class
from deepspot.reference import safe_torch_load
from deepspot.scaler import Scaler

# Tiny sizes keep the whole module fast; E=10 is the real ensemble size, so the real median network is exercised.
D, H, G, E = 16, 8, 5, 10
REFERENCE_NAMES = ("spot_subspot_neighbors", "cell_neighbors_max")


def tiny_model(family: str, mode: str, *, n_ensemble: int = E, seed: int = 0, scaler: bool = True, **kwargs):
    """A small eval-mode model with non-trivial biases, a scaler and gene names."""
    model = create_model(
        family, mode, input_size=D, output_size=G, phi2rho_size=H, n_ensemble=n_ensemble, random_seed=seed, **kwargs
    )
    with torch.no_grad():
        # Default init gives small biases; larger ones make the ReLU and the median select differently per member.
        for phi in model.phi:
            phi.model[0].bias.normal_(0.0, 0.5)
    if scaler:
        model.scaler = Scaler("standard", np.linspace(-2.0, 3.0, G), np.linspace(0.5, 4.0, G))
    model.genes = [f"GENE{i}" for i in range(G)]
    return model.eval()


@pytest.fixture
def make_model():
    """``make_model(family, mode, **kwargs)``: see :func:`tiny_model`."""
    return tiny_model


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/fixtures/reference`` beside the repository root (the same layout in CI)."""
    path = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "reference"
    if not path.is_dir():
        pytest.fail(f"reference fixtures not found at {path.resolve()}")
    return path.resolve()


def reference_model(reference_dir: Path, name: str):
    """The reference fixture's model, rebuilt from its Lightning ``.ckpt`` (weights, hyperparameters, scaler)."""
    ckpt = safe_torch_load(reference_dir / f"{name}.ckpt")
    hparams = dict(ckpt["hyper_parameters"])
    scaler = Scaler.from_object(hparams.pop("scaler", None))
    family = "spot" if "spot_context" in hparams else "cell"
    model = model_class(family)(**hparams, scaler=scaler)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


@pytest.fixture(scope="session", params=REFERENCE_NAMES)
def reference(request, reference_dir):
    """``(name, model, arrays)`` for each reference fixture."""
    name = request.param
    arrays = dict(np.load(reference_dir / f"{name}.npz"))
    return name, reference_model(reference_dir, name), arrays


def _run_onnx(path, feed: dict[str, np.ndarray]) -> np.ndarray:
    from deepspot.export import session_from_onnx

    return session_from_onnx(path).run(["expression"], feed)[0]


@pytest.fixture
def run_onnx():
    """``run_onnx(path, feed) -> expression`` on onnxruntime's CPU provider."""
    return _run_onnx


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(family, mode, optimize=True, **model_kwargs) -> (model, ExportResult)``, each exported once."""
    from deepspot.export import export_onnx

    cache = {}
    folder = tmp_path_factory.mktemp("exported")

    def get(family: str, mode: str, optimize: bool = True, **model_kwargs):
        key = (family, mode, optimize, tuple(sorted(model_kwargs.items())))
        if key not in cache:
            model = tiny_model(family, mode, **model_kwargs)
            name = "_".join(str(part) for part in (family, mode, optimize, *model_kwargs.values()))
            cache[key] = model, export_onnx(model, folder / f"{name}.onnx", optimize=optimize)
        return cache[key]

    return get
