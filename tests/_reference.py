"""Helpers to read the reference fixtures in ../shared/fixtures/reference (a sibling of the repository)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO.parent / "shared" / "fixtures" / "reference"
FIXTURES = {"spot": "spot_subspot_neighbors", "cell": "cell_neighbors_max"}


def reference_model(family: str):
    """The reference fixture's model, rebuilt from its Lightning checkpoint's state dict and hyperparameters."""
    from deepspot.factory import model_class
    from deepspot.reference import safe_torch_load

    ckpt = safe_torch_load(REFERENCE_DIR / f"{FIXTURES[family]}.ckpt")
    hp = dict(ckpt["hyper_parameters"])
    rec = hp.pop("scaler")
    from deepspot.scaler import Scaler

    model = model_class(family)(**hp, scaler=Scaler("standard", rec.mean_, rec.scale_))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def reference_data(family: str) -> dict[str, np.ndarray]:
    with np.load(REFERENCE_DIR / f"{FIXTURES[family]}.npz") as z:
        return {k: z[k] for k in z.files}
