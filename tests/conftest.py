"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import importlib.util

import numpy as np
import pytest

from _reference import REFERENCE_DIR, cpu_vendor, trajectory_fixture


def pytest_report_header(config):
    # Which reference run the exact-training test compares with, and how (see tests/_reference.py).
    return f"reference training trajectory: {trajectory_fixture(cpu_vendor())[2]}"


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
    # The torch-free tests (tests/lean) also run where PyTorch is not installed.
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(2)
    yield
