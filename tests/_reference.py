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


# --- Training trajectories: exact only on the CPU family that made them (see the fixtures' README) ---------------

TRAJECTORY = "trajectory_spot_subspot_neighbors_seed2024"
TRAJECTORY_FILES = {"AuthenticAMD": f"{TRAJECTORY}.npz", "GenuineIntel": f"{TRAJECTORY}_intel.npz"}
TRAJECTORY_ULPS = 4  # the AMD and Intel runs differ by at most 2 float32 ulps; other CPUs get this much room


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first ``vendor_id`` in ``/proc/cpuinfo`` (``AuthenticAMD``, ``GenuineIntel``); None where there is none."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "vendor_id":
            return value.strip()
    return None


class TrajectoryReference:
    """Which training-trajectory fixture a machine compares with, and how strictly.

    On an x86 CPU family that made a fixture (AMD, Intel): that family's file, bit for bit. Anywhere else: the AMD
    file, within ``TRAJECTORY_ULPS`` float32 ulps. ``describe`` says which, for assertion messages and the report.
    """

    def __init__(self, vendor: str | None, directory: Path = REFERENCE_DIR):
        self.vendor = vendor
        self.exact = vendor in TRAJECTORY_FILES
        self.path = directory / TRAJECTORY_FILES[vendor if self.exact else "AuthenticAMD"]

    def describe(self) -> str:
        how = "bit for bit" if self.exact else f"within {TRAJECTORY_ULPS} float32 ulps"
        return f"{self.path.name} ({how}; CPU vendor_id {self.vendor or 'unknown'})"

    def load(self) -> dict[str, np.ndarray]:
        with np.load(self.path) as z:
            return {k: z[k] for k in z.files}

    def assert_matches(self, actual, expected, what: str) -> None:
        actual = np.asarray(actual)
        expected = np.asarray(expected)
        msg = f"{what} against {self.describe()}"
        if self.exact:
            np.testing.assert_array_equal(actual, expected, err_msg=msg)
            return
        assert actual.shape == expected.shape, msg
        # Losses are stored as float64 but computed in float32: count ulps at float32 spacing.
        spacing = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
        ulps = np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / spacing
        assert np.all(ulps <= TRAJECTORY_ULPS), f"{msg}: off by up to {np.nanmax(ulps):.0f} ulps"


def trajectory_reference() -> TrajectoryReference:
    """The trajectory fixture this machine's CPU family compares with."""
    return TrajectoryReference(cpu_vendor())
