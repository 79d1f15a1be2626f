"""The Snakemake workflow: three tiny slides through the local executor, and a dry run of the SLURM profile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deepspot

pytest.importorskip("snakemake")
WORKFLOW = Path(__file__).resolve().parents[2] / "workflow"
D = 6


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Three slides in the reference's layout, a slides table and an indexed export."""
    root = tmp_path_factory.mktemp("workflow")
    rng = np.random.default_rng(0)
    lines = ["slide,obs,features"]
    for slide in ("a", "b", "c"):
        features = root / f"features_{slide}"
        features.mkdir()
        obs = ["barcode,x_array,y_array"]
        for i in range(9):
            np.save(features / f"S{i}.npy", rng.standard_normal((4, D)).astype(np.float32))
            obs.append(f"S{i},{i // 3},{i % 3}")
        (root / f"obs_{slide}.csv").write_text("\n".join(obs) + "\n")
        lines.append(f"{slide},obs_{slide}.csv,features_{slide}")
    (root / "slides.csv").write_text("\n".join(lines) + "\n")
    model = deepspot.create_model("spot", "subspot_neighbors", input_size=D, output_size=3, phi2rho_size=4, n_ensemble=2)
    deepspot.save(model, root / "model.safetensors")
    from deepspot.export.indexed import export_indexed

    export_indexed(root / "model.safetensors", root / "model-indexed")
    return root


def snakemake(project: Path, fmt: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", *args, "-s", str(WORKFLOW / "Snakefile"), "--configfile",
               str(WORKFLOW / "config.yaml"), "--config", f"deepspot={sys.executable} -m deepspot.cli",
               f"format={fmt}"]  # fmt: skip
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_workflow_runs_each_slide_locally(project):
    result = snakemake(project, "npz", "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for slide in ("a", "b", "c"):
        pred = np.load(project / "results" / f"{slide}.npz")
        assert pred["predictions"].shape == (9, 3)
        single = project / f"{slide}-single.npz"
        run = subprocess.run([sys.executable, "-m", "deepspot.cli", "infer", "model-indexed", "-i",
                              f"results/bundles/{slide}.npz", "-o", str(single), "--no-progress"],
                             cwd=project, capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr
        np.testing.assert_array_equal(pred["predictions"], np.load(single)["predictions"])
    again = snakemake(project, "npz", "--cores", "2")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_the_slurm_profile_dry_run(project):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    result = snakemake(project, "npy", "-n", "--profile", str(WORKFLOW / "profiles" / "slurm"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "This was a dry-run" in out
    assert out.count("rule predict:") == 3 and "gpu=1" in out and "slurm_partition=gpu" in out
