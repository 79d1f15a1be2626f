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


# -- training results across CPU families ------------------------------------------------------------------------
#: The reference's training run, by the CPU family that made it (``/proc/cpuinfo`` ``vendor_id``): results that go
#: through the BLAS are exact only on the family that made them (see the fixtures' README).
TRAJECTORIES = {
    "AuthenticAMD": "trajectory_spot_subspot_neighbors_seed2024.npz",
    "GenuineIntel": "trajectory_spot_subspot_neighbors_seed2024_intel.npz",
}
#: Agreement with a fixture made on another CPU family, in float32 units in the last place (measured: 2).
ULPS_ACROSS_FAMILIES = 4


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The ``vendor_id`` of this machine's CPU, or ``None`` where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def trajectory_fixture(vendor: str | None) -> tuple[Path, bool, str]:
    """``(path, exact, description)``: the fixture of ``vendor``'s family, compared bit for bit, or else the AMD one
    within :data:`ULPS_ACROSS_FAMILIES` ulps."""
    if vendor in TRAJECTORIES:
        return REFERENCE_DIR / TRAJECTORIES[vendor], True, f"{TRAJECTORIES[vendor]} bit for bit ({vendor})"
    name = TRAJECTORIES["AuthenticAMD"]
    return REFERENCE_DIR / name, False, f"{name} within {ULPS_ACROSS_FAMILIES} ulps (CPU {vendor or 'unknown'})"


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance between ``a`` and ``b`` in float32 units in the last place (both cast to float32)."""
    a = np.ascontiguousarray(a, dtype=np.float32).view(np.int32).astype(np.int64)
    b = np.ascontiguousarray(b, dtype=np.float32).view(np.int32).astype(np.int64)
    # Map the sign-magnitude ints onto a monotonic line, so that -0.0 and 0.0 are 0 ulps apart.
    a = np.where(a < 0, np.int64(-(2**31)) - a, a)
    b = np.where(b < 0, np.int64(-(2**31)) - b, b)
    return int(np.max(np.abs(a - b))) if a.size else 0


def assert_same_training(actual: np.ndarray, expected: np.ndarray, exact: bool, what: str,
                         ulps: int = ULPS_ACROSS_FAMILIES) -> None:  # fmt: skip
    """Bit-for-bit equality on the fixture's own CPU family; agreement within ``ulps`` on another."""
    if exact:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        distance = ulp_distance(actual, expected)
        assert distance <= ulps, f"{what}: {distance} ulps from the reference (> {ulps})"
