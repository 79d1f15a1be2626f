"""The workflow as the README runs it: a failing slide, inputs changed in place, overrides with the SLURM profile."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deepspot

pytest.importorskip("snakemake")
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflow"
D = 6
#: The README's paths, as this checkout has them (the README runs from the repository's root).
PATHS = {"workflow/Snakefile": WORKFLOW / "Snakefile", "workflow/config.yaml": WORKFLOW / "config.yaml",
         "my.yaml": WORKFLOW / "config.yaml", "workflow/profiles/slurm": WORKFLOW / "profiles" / "slurm"}  # fmt: skip


def readme_commands() -> dict[str, list[str]]:
    """The snakemake command lines of the README's "Cohorts and clusters", by their comment (``here``, ...)."""
    section = (ROOT / "README.md").read_text().split("## Cohorts and clusters")[1].split("\n## ")[0]
    commands = {}
    for line in section.splitlines():
        if line.startswith("snakemake "):
            command, _, comment = line.partition("#")
            args = [str(PATHS.get(a, a)) for a in shlex.split(command)[1:]]
            commands[comment.strip().split()[-1]] = [sys.executable, "-m", "snakemake", *args]
    return commands


def make_slide(root: Path, slide: str, rng: np.random.Generator, n: int = 9) -> str:
    """A slide in the reference's layout (a folder of <barcode>.npy and an obs CSV); its slides-table line."""
    features = root / f"features_{slide}"
    features.mkdir()
    obs = ["barcode,x_array,y_array"]
    for i in range(n):
        np.save(features / f"S{i}.npy", rng.standard_normal((4, D)).astype(np.float32))
        obs.append(f"S{i},{i // 3},{i % 3}")
    (root / f"obs_{slide}.csv").write_text("\n".join(obs) + "\n")
    return f"{slide},obs_{slide}.csv,features_{slide}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """An indexed export of a tiny untrained model."""
    from deepspot.export.indexed import export_indexed

    root = tmp_path_factory.mktemp("model")
    net = deepspot.create_model("spot", "subspot_neighbors", input_size=D, output_size=3, phi2rho_size=4, n_ensemble=2)
    deepspot.save(net, root / "model.safetensors")
    export_indexed(root / "model.safetensors", root / "model-indexed")
    return root / "model-indexed"


@pytest.fixture
def project(tmp_path, model) -> Path:
    """Two slides and a slides table; the model linked in as config.yaml names it."""
    rng = np.random.default_rng(0)
    lines = ["slide,obs,features", *(make_slide(tmp_path, s, rng) for s in ("a", "b"))]
    (tmp_path / "slides.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "model-indexed").symlink_to(model, target_is_directory=True)
    return tmp_path


def run(project: Path, command: list[str], *config: str) -> subprocess.CompletedProcess:
    config = ("--config", f"deepspot={sys.executable} -m deepspot.cli", "format=npz", *config)
    return subprocess.run([*command, *config], cwd=project, capture_output=True, text=True, timeout=120)


def test_a_corrupt_slide_fails_alone_with_the_readme_command(project):
    (project / "features_a" / "S4.npy").write_bytes(b"\x93NUMPY garbage")
    result = run(project, readme_commands()["here"])
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert "Error: features_a/S4.npy: not a readable .npy file" in log
    assert np.load(project / "results" / "b.npz")["predictions"].shape == (9, 3)  # the other slide finished
    assert not (project / "results" / "a.npz").exists() and not (project / "results" / "bundles" / "a.npz").exists()


def test_the_slurm_profile_keeps_going_after_a_failed_slide():
    import yaml

    profile = yaml.safe_load((WORKFLOW / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["keep-going"] is True


def test_the_slurm_profile_runs_ort_cuda_with_config_overrides(project):
    # A profile's own `config:` is replaced by any --config on the command line, which used to drop its backend
    # (ort-cpu on a job given a GPU); the backend now follows the job's gpu resource.
    pytest.importorskip("snakemake_executor_plugin_slurm")
    result = run(project, [*readme_commands()["SLURM"], "-n", "-p"], "output_dir=elsewhere")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    infers = [line for line in log.splitlines() if " infer " in line]
    assert len(infers) == 2 and all("-o elsewhere/" in c and "--backend ort-cuda " in c for c in infers), infers
    local = run(project, [*readme_commands()["here"], "-n", "-p"], "output_dir=elsewhere")
    assert local.returncode == 0 and local.stdout.count("--backend ort-cpu ") == 2, local.stdout[-3000:]


def test_a_file_rewritten_in_place_in_an_input_folder_is_redone(project, model):
    # Snakemake compares a folder's own modification time, which a file rewritten in place leaves alone.
    (project / "model-indexed").unlink()
    shutil.copytree(model, project / "model-indexed")
    results = project / "results"
    outputs = [*(results / "bundles" / f"{s}.npz" for s in "ab"), *(results / f"{s}.npz" for s in "ab")]
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    inputs = [p for p in project.rglob("*") if p not in outputs and p.parent not in {o.parent for o in outputs}]
    for path in inputs:
        os.utime(path, (1e9, 1e9))  # every input older than every output: nothing to do
    for path in (project / "features_a" / "S4.npy", project / "model-indexed" / "head.onnx"):
        path.write_bytes(path.read_bytes())  # in place: the folder keeps its time
        assert path.parent.stat().st_mtime == 1e9
    result = run(project, [*readme_commands()["here"], "-n"])
    stats = result.stdout.partition("Job stats:")[2].splitlines()[3:6]
    # Slide a's bundle (its features) and both predictions (the model); slide b's bundle is up to date.
    assert dict(line.split() for line in stats) == {"bundle": "1", "predict": "2", "all": "1"}, result.stdout[-3000:]
    assert "Updated input files: features_a/S4.npy" in result.stdout


def test_paths_with_spaces_reach_deepspot_as_one_argument_each(project):
    rng = np.random.default_rng(1)
    (project / "slides.csv").write_text("slide,obs,features\n" + make_slide(project, "slide one", rng) + "\n")
    result = run(project, [*readme_commands()["here"], "-n", "-p", "--forceall"])
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [shlex.split(line) for line in result.stdout.splitlines() if " -m deepspot.cli " in line]
    bundle, predict = (next(c for c in commands if name in c) for name in ("bundle", "infer"))
    assert {"features_slide one", "obs_slide one.csv", "results/bundles/slide one.npz"} <= set(bundle), bundle
    assert {"results/bundles/slide one.npz", "results/slide one.npz"} <= set(predict), predict


@pytest.mark.parametrize(
    ("table", "message"),
    [("slide,features\na,features_a\n", "slides.csv: the slides table needs columns slide, obs and features"),
     ("slide,obs,features\na,,features_a\n", "slides.csv: line 2 needs a slide, an obs and one of features"),
     ("slide,obs,features\nx/a,obs_a.csv,features_a\n", "slides.csv: line 2: slide 'x/a' is a path")],
)  # fmt: skip
def test_a_wrong_slides_table_is_named_before_any_job(project, table, message):
    (project / "slides.csv").write_text(table)
    result = run(project, [*readme_commands()["here"], "-n"])
    assert result.returncode == 1 and message in result.stderr + result.stdout, result.stderr[-3000:]
