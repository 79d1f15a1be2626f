"""Fixtures of the importer tests: where the reference's artifacts are, and a forward pass as the reference ran it.

The tests run in pytest's importlib mode, so helpers are handed out as fixtures rather than imported.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

#: ``shared`` is a sibling of the repository root, here and in CI.
REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference"
#: The issue's bound on the difference to the reference's outputs.
TOLERANCE = 1e-6
INPUT_KEYS = ("spot", "cell", "subspot", "neighbors")


def _case(name: str) -> dict[str, np.ndarray]:
    """The inputs and the reference model's outputs of one fixture."""
    with np.load(REFERENCE / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def _predict(model, case: dict[str, np.ndarray]) -> np.ndarray:
    """``model(**inputs)`` in eval mode without gradients, as the reference's outputs were made."""
    model.eval()
    inputs = {k: torch.from_numpy(case[k]) for k in INPUT_KEYS if k in case}
    with torch.no_grad():
        return model(**inputs).numpy()


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/fixtures/reference``: files made by the reference code."""
    if not REFERENCE.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def ref(reference_dir) -> SimpleNamespace:
    """Helpers: ``case(name)``, ``predict(model, case)``, ``max_abs(a, b)`` and ``tol``."""
    return SimpleNamespace(case=_case, predict=_predict, max_abs=_max_abs, tol=TOLERANCE, dir=reference_dir)
