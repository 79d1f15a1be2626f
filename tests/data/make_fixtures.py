"""Rebuild the torch-free tests' fixtures (needs the full install): ``python tests/data/make_fixtures.py``.

A tiny spot/subspot_neighbors model (D=8, H=4, E=3, G=5, with a scaler and gene names), exported per item
(``spot.onnx``) and in the indexed layout (``spot-indexed/``), a 40-spot slide as neighbour copies (``slide.npz``)
and by index (``slide-index.npz``), and the eager PyTorch model's predictions on it (``expected.npy``, standardised
scale; ``expected-original.npy``, through the scaler). The tests in tests/lean run these without PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepspot.data import densify, save_bundle, synth_slide
from deepspot.export import export_onnx
from deepspot.export.indexed import export_indexed
from deepspot.factory import create_model
from deepspot.scaler import Scaler

HERE = Path(__file__).resolve().parent


def main() -> None:
    model = create_model("spot", "subspot_neighbors", input_size=8, output_size=5, phi2rho_size=4, n_ensemble=3,
                         random_seed=7).eval()  # fmt: skip
    model.scaler = Scaler("standard", np.linspace(1.0, 2.0, 5), np.linspace(0.5, 1.5, 5))
    model.genes = [f"G{j}" for j in range(5)]
    export_onnx(model, HERE / "spot.onnx")
    export_indexed(model, HERE / "spot-indexed")
    slide = synth_slide("spot", 40, 8, 6, seed=3, n_subspots=3)
    slide = {k: slide[k] for k in ("spot", "subspot", "neighbor_index")}
    save_bundle(HERE / "slide-index.npz", slide)
    dense = {"spot": slide["spot"].reshape(40, 1, 8), "subspot": slide["subspot"],
             "neighbors": densify(slide["spot"].reshape(40, 8), slide["neighbor_index"])}  # fmt: skip
    save_bundle(HERE / "slide.npz", dense)
    with torch.no_grad():
        pred = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dense.items()}).numpy()
    np.save(HERE / "expected.npy", pred.astype(np.float32))
    np.save(HERE / "expected-original.npy", model.scaler.inverse_transform(pred).astype(np.float32))


if __name__ == "__main__":
    main()
