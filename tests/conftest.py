"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _reference import REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _torch_threads():
    # The CI machine has 2 cores; keep torch from oversubscribing them when tests run alongside onnxruntime.
    torch.set_num_threads(2)
    yield


def pytest_report_header(config):
    from _reference import trajectory_reference

    return f"training trajectory reference: {trajectory_reference().describe()}"
