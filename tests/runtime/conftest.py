"""Tiny models of every mode, their checkpoints, ONNX exports and bundles, built once per test session."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from deepspot import checkpoint
from deepspot.data import save_bundle, synth_bundle
from deepspot.factory import create_model
from deepspot.scaler import Scaler

D, H, E, G = 16, 8, 10, 5  # tiny sizes: every test stays fast on 2 cores
BAGS = {"subspot": 3, "neighbors": 4}


@functools.cache
def _probe():
    from deepspot.runtime.backends import Probe

    return Probe.detect()


def _backend(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` runs here, by the product's own probe: a GPU provider that onnxruntime lists but
    that cannot load or finds no GPU (onnxruntime-gpu without TensorRT's libraries) skips, with the product's reason."""
    from deepspot.runtime.backends import unavailable_reason

    reason = unavailable_reason(name, _probe())
    return reason is None, str(reason)


NEEDS = {
    "cuda": lambda: (torch.cuda.is_available(), "needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
    "ort-cuda": lambda: _backend("ort-cuda"),
    "ort-trt": lambda: _backend("ort-trt"),
    "tensorrt": lambda: _backend("tensorrt"),
}


@pytest.fixture
def require():
    """``require("cuda")``: skip the test, with the reason, where the hardware or package is missing."""

    def check(what: str) -> None:
        available, reason = NEEDS[what]()
        if not available:
            pytest.skip(reason)

    return check


@dataclass
class Artifacts:
    """One tiny model and everything made from it."""

    model: torch.nn.Module
    checkpoint: Path
    onnx: Path
    bundle: Path
    arrays: dict[str, np.ndarray]

    def inputs(self) -> dict[str, np.ndarray]:
        """The bundle's model inputs, shaped as the runners take them."""
        return {
            name: a[:, None, :] if a.ndim == 2 else a
            for name, a in self.arrays.items()
            if name in self.model.mode.input_names
        }


def tiny_model(family: str, mode: str, seed: int = 0, scaler: bool = True):
    """A small eval-mode model with a scaler and gene names; larger Phi biases make the median and ReLU matter."""
    extra = {"agg_neighbors": "mean"} if family == "cell" else {}
    model = create_model(
        family, mode, input_size=D, output_size=G, phi2rho_size=H, n_ensemble=E, random_seed=seed, **extra
    )
    with torch.no_grad():
        for phi in model.phi:
            phi.model[0].bias.normal_(0.0, 0.5)
    if scaler:
        rng = np.random.default_rng(seed)
        model.scaler = Scaler("standard", rng.normal(size=G) * 3, rng.uniform(0.5, 2.0, size=G))
    model.genes = [f"g{j}" for j in range(G)]
    return model.eval()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """``artifacts(family, mode, n=37)``: a cached :class:`Artifacts` per mode (and item count)."""
    from deepspot.export import export_onnx

    cache: dict[tuple, Artifacts] = {}
    root = tmp_path_factory.mktemp("runtime-artifacts")

    def get(family: str = "spot", mode: str = "subspot_neighbors", n: int = 37) -> Artifacts:
        key = (family, mode, n)
        if key not in cache:
            folder = root / f"{family}-{mode}-{n}"
            folder.mkdir()
            model = tiny_model(family, mode)
            ckpt = checkpoint.save(model, folder / "model.safetensors")
            onnx = folder / "model.onnx"
            export_onnx(model, onnx)
            arrays = synth_bundle(
                family, mode, n, D, G, seed=1, n_subspots=BAGS["subspot"], n_neighbors=BAGS["neighbors"]
            )
            arrays["genes"] = np.array(model.genes)
            bundle = save_bundle(folder / "bundle.npz", arrays)
            cache[key] = Artifacts(model, ckpt, onnx, bundle, arrays)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def make_model():
    """``make_model(family, mode, seed=0, scaler=True)``: a fresh tiny model."""
    return tiny_model


@pytest.fixture(scope="session")
def eager():
    """``eager(model, inputs)``: the eager PyTorch model's predictions as NumPy."""

    def run(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            feed = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in inputs.items()}
            return model(**feed).numpy()

    return run


class Sessions(list):
    """The sessions made while ``replaying`` is on; ``cuda_graphs`` says whether new ones capture graphs."""

    cuda_graphs = True
    device = None  # (AsyncHostCuda, compute stream): new sessions run there, deferred


@pytest.fixture
def replaying(monkeypatch):
    """Every onnxruntime session made from here on replays captured CUDA graphs as the CUDA provider does
    (:class:`tests.runtime.graph_replay.ReplaySession`); returns the list of them."""
    from deepspot.runtime import ort

    from .graph_replay import ReplaySession

    sessions = Sessions()
    real = ort.session_from_onnx

    def make(*args, **kwargs):
        sessions.append(ReplaySession(real(*args, **kwargs), sessions.cuda_graphs))
        sessions[-1].device = sessions.device
        return sessions[-1]

    monkeypatch.setattr(ort, "session_from_onnx", make)
    return sessions
