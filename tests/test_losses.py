"""Losses of both families against the definitions in MODEL_SPEC.md, written out in NumPy; and fix_seed."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from deepspot.cell.loss import LOSSES as CELL
from deepspot.spot.loss import LOSSES as SPOT
from deepspot.utils import fix_seed

rng = np.random.default_rng(0)
PRED = rng.standard_normal((16, 7))
TARGET = rng.standard_normal((16, 7)) + 0.5 * PRED
COUNTS = rng.poisson(2.0, size=(16, 7)).astype(np.float64)


def cos_per_gene(a, b):
    return (a * b).sum(0) / np.maximum(np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0), 1e-8)


def cos_loss(p, t):
    return np.mean(1 - cos_per_gene(p, t))


def mse(p, t):
    return np.mean((p - t) ** 2)


def huber(p, t, delta=1.0):
    d = np.abs(p - t)
    return np.mean(np.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)))


def poisson(p, t):
    rate = np.exp(p)  # the reference exponentiates the prediction, then torch's default log_input=True applies
    return np.mean(np.exp(rate) - t * rate)


def spot_pearson(p, t):
    pc, tc = p - p.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    r = (pc * tc).sum(1) / np.maximum(np.linalg.norm(pc, axis=1) * np.linalg.norm(tc, axis=1), 1e-8)
    return np.mean(1 - r)


def cell_pearson(p, t, eps=1e-8):
    pc, tc = p - p.mean(0), t - t.mean(0)
    r = (pc * tc).sum(0) / (np.sqrt((pc**2).sum(0) + eps) * np.sqrt((tc**2).sum(0) + eps))
    return np.mean(1 - r)


EXPECTED = {
    ("spot", "mse"): mse,
    ("spot", "cos"): cos_loss,
    ("spot", "mse_cos"): lambda p, t: cos_loss(p, t) + mse(p, t),
    ("spot", "pearson"): spot_pearson,
    ("spot", "mse_pearson"): lambda p, t: cos_loss(p, t) + 0.2 * mse(p, t),
    ("spot", "poisson"): poisson,
    ("cell", "mse"): mse,
    ("cell", "cos"): cos_loss,
    ("cell", "mse_cos"): lambda p, t: cos_loss(p, t) + mse(p, t),
    ("cell", "pearson"): cell_pearson,
    ("cell", "mse_pearson"): lambda p, t: 0.1 * cos_loss(p, t) + mse(p, t),
    ("cell", "poisson"): poisson,
    ("cell", "l1"): lambda p, t: np.mean(np.abs(p - t)),
    ("cell", "huber"): huber,
    ("cell", "l1_cos"): lambda p, t: cos_loss(p, t) + np.mean(np.abs(p - t)),
    ("cell", "huber_cos"): lambda p, t: cos_loss(p, t) + huber(p, t),
}


def test_every_loss_has_an_expected_definition():
    assert set(EXPECTED) == {("spot", k) for k in SPOT} | {("cell", k) for k in CELL}


@pytest.mark.parametrize("family, name", sorted(EXPECTED))
def test_loss_matches_its_definition(family, name):
    fn = (SPOT if family == "spot" else CELL)[name]
    target = COUNTS if name == "poisson" else TARGET
    pred = 0.3 * PRED if name == "poisson" else PRED
    got = fn(torch.from_numpy(pred), torch.from_numpy(target)).item()
    assert got == pytest.approx(EXPECTED[(family, name)](pred, target), rel=1e-9, abs=1e-12)


def test_fix_seed_sets_every_generator_and_the_environment():
    fix_seed(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    fix_seed(123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    assert os.environ["PYTHONHASHSEED"] == "123" and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
