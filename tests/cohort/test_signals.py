"""Killed by a scheduler: SIGTERM cleans up like Ctrl-C (one line, exit 143), an interrupt at any moment gives no
traceback, and the next run in a folder removes what a SIGKILL left. Real processes, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import deepspot
from deepspot.data import load_bundle, save_bundle, synth_bundle
from deepspot.fileio import host_tag

D = 64


def start(*args, cwd=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell runs background jobs with SIGINT ignored, and Python then leaves it ignored: give the child the
    # default disposition, as a command started from a terminal has.
    return subprocess.Popen([sys.executable, "-m", "deepspot.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for(predicate, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A model and a slide big enough to be caught in the middle of its inference (a few seconds on 2 cores)."""
    root = tmp_path_factory.mktemp("signals")
    model = deepspot.create_model("cell", "neighbors", input_size=D, output_size=200, phi2rho_size=256, n_ensemble=10)
    ckpt = deepspot.save(model, root / "model.safetensors")
    data = synth_bundle("cell", "neighbors", 30_000, D, 8, n_neighbors=8)
    dense = save_bundle(root / "dense.npz", data)
    data.pop("neighbors")
    data["neighbor_index"] = np.random.default_rng(0).integers(-1, 30_000, size=(30_000, 8))
    indexed = save_bundle(root / "indexed.npz", data)
    return {"ckpt": ckpt, "dense": dense, "indexed": indexed, "root": root}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dense", "indexed"])
def test_sigterm_during_infer_cleans_up_and_exits_143(tmp_path, slide, layout):
    out = tmp_path / "pred.npz"
    args = ["--table", "mmap"] if layout == "indexed" else []
    proc = start("infer", slide["ckpt"], "-i", slide[layout], "-o", out, "--batch-size", "64", "--no-progress", *args)
    assert wait_for(lambda: len(hidden(tmp_path)) >= (2 if layout == "indexed" else 1)), "never started writing"
    code, err = stop(proc, signal.SIGTERM)
    assert code == 143, err
    assert err.strip().splitlines() == ["Terminated."]
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


@pytest.mark.slow
def test_sigterm_during_a_cohort(tmp_path, slide):
    out = tmp_path / "out"
    proc = start("infer", slide["ckpt"], "-i", slide["dense"], slide["indexed"], "--output-dir", out, "--format", "npz",
                 "--batch-size", "64", "--no-progress")  # fmt: skip
    assert wait_for(lambda: out.is_dir() and any(p.name.startswith(".predictions") for p in out.iterdir()))
    code, err = stop(proc, signal.SIGTERM)
    assert code == 143 and "Traceback" not in err, err
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert not (out / "dense.npz").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopping_a_cohort_with_workers_leaves_nothing_behind(tmp_path, slide, sig, code):
    """The parent stops its workers with SIGTERM; each removes the temporary files of the slide it was on."""
    out = tmp_path / "out"
    proc = start("infer", slide["ckpt"], "-i", slide["dense"], slide["indexed"], "--output-dir", out, "--format", "npz",
                 "--batch-size", "64", "--no-progress", "--devices", "cpu,cpu", "--table", "mmap")  # fmt: skip
    assert wait_for(lambda: out.is_dir() and len([p for p in out.iterdir() if p.name.startswith(".predictions")]) == 2)
    got, err = stop(proc, sig)
    assert got == code and "Traceback" not in err, err
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert not (out / "dense.npz").exists() and not (out / "indexed.npz").exists()


@pytest.mark.slow
def test_sigterm_during_train_and_export_and_bundle(tmp_path, slide):
    proc = start("train", "--data", slide["dense"], "--family", "cell", "--mode", "neighbors", "--epochs", "50",
                 "--no-progress", "-o", tmp_path / "run")  # fmt: skip
    time.sleep(4)
    code, err = stop(proc, signal.SIGTERM)
    assert code == 143 and err.strip().splitlines()[-1] == "Terminated." and "Traceback" not in err, err
    assert not (tmp_path / "run" / "model.safetensors").exists()

    big = deepspot.create_model("spot", "subspot_neighbors", input_size=1024, output_size=5000, phi2rho_size=512)
    ckpt = deepspot.save(big, tmp_path / "big.safetensors")
    proc = start("export", ckpt, "-o", tmp_path / "big.onnx")
    assert wait_for(lambda: any(p.name.startswith(".big.onnx") for p in tmp_path.iterdir()))
    code, err = stop(proc, signal.SIGTERM)
    assert code == 143 and "Traceback" not in err, err
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".onnx"] == []

    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    lines = ["barcode,x_pixel,y_pixel"]
    for i in range(3000):
        np.save(features / f"c{i}.npy", rng.standard_normal(D).astype(np.float32))
        lines.append(f"c{i},{rng.uniform(0, 1000)},{rng.uniform(0, 1000)}")
    (tmp_path / "cells.csv").write_text("\n".join(lines) + "\n")
    proc = start("bundle", "--features", features, "--obs", tmp_path / "cells.csv", "--family", "cell", "-o",
                 tmp_path / "cells.npz")  # fmt: skip
    time.sleep(2.5)
    code, err = stop(proc, signal.SIGTERM)
    # It may have finished (0), or finished and been exiting when the signal came: Python restores the default
    # handlers as it shuts down, so that is death by the signal (-SIGTERM). Either way the bundle is whole.
    assert code in (0, 143, -signal.SIGTERM) and "Traceback" not in err, err
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    if code != 143:
        assert load_bundle(tmp_path / "cells.npz").n == 3000
    else:
        assert not (tmp_path / "cells.npz").exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 1.0, 2.0])  # after the interpreter itself has started
def test_ctrl_c_at_any_moment_gives_no_traceback(tmp_path, slide, delay):
    proc = start("infer", slide["ckpt"], "-i", slide["dense"], "-o", tmp_path / "p.npy", "--no-progress")
    time.sleep(delay)
    code, err = stop(proc, signal.SIGINT)
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "Interrupted."
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_sigkill_leaves_files_that_the_next_run_removes(tmp_path, slide):
    out = tmp_path / "p.npz"
    proc = start("infer", slide["ckpt"], "-i", slide["dense"], "-o", out, "--batch-size", "64", "--no-progress")
    assert wait_for(lambda: bool(hidden(tmp_path)))
    proc.kill()  # SIGKILL: no clean-up can run
    proc.wait()
    left = hidden(tmp_path)
    assert left and all(f".pid{proc.pid}-{host_tag()}." in name for name in left)
    small = save_bundle(tmp_path.parent / f"{tmp_path.name}-small.npz", synth_bundle("cell", "neighbors", 10, D, 8, n_neighbors=8))
    done = start("infer", slide["ckpt"], "-i", small, "-o", tmp_path / "other.npy", "--no-progress")
    _, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    assert hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["other.npy"]


@pytest.mark.parametrize("where", ["parse_args", "invoke"])
def test_ctrl_c_outside_a_command_says_so_too(where):
    """typer turns a KeyboardInterrupt raised outside the command (while it parses the options, or around the call)
    into a silent exit 130: the one line must still come."""
    script = (
        "import typer.core, deepspot.cli\n"
        "def interrupted(*a, **k): raise KeyboardInterrupt\n"
        f"typer.core.TyperGroup.{where} = interrupted\n"
        "import sys; sys.argv = ['deepspot', 'info', 'model.onnx']; deepspot.cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip().splitlines() == ["Interrupted."], proc.stderr


class _Stop(BaseException):
    pass


@pytest.mark.parametrize("make", ["atomic_path", "predictions", "embedding table"])
def test_a_signal_just_after_a_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch, make):
    """SIGTERM landing right after the file was made (the moment a worker's parent stops it): the code that removes
    the file must already be armed, so the file goes with the unwinding. With ``mkstemp`` it was not yet."""
    import tempfile

    from deepspot import fileio
    from deepspot.runtime.indexed import embedding_table
    from deepspot.runtime.infer import _temporary_npy

    real_open, real_mkstemp = os.open, tempfile.mkstemp

    def then_signal(made):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs in the main thread at once
        return made

    monkeypatch.setattr(os, "open", lambda path, *a, **k: then_signal(real_open(path, *a, **k))
                        if str(path).startswith(str(tmp_path)) else real_open(path, *a, **k))  # fmt: skip
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: then_signal(real_mkstemp(*a, **k)))  # the old way
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(_Stop()))
    try:
        opened = {"atomic_path": lambda: fileio.atomic_path(tmp_path / "out.npy"),
                  "predictions": lambda: _temporary_npy(tmp_path, 3, 2),
                  "embedding table": lambda: embedding_table(3, 2, np.float32, "mmap", tmp_path)}[make]  # fmt: skip
        with pytest.raises(_Stop):
            with opened():
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("sig", "exc", "code", "said"),
                         [(signal.SIGINT, KeyboardInterrupt, 130, "Interrupted."),
                          (signal.SIGTERM, "Terminated", 143, "Terminated.")])  # fmt: skip
def test_an_error_raised_after_a_signal_is_reported_as_the_signal(capsys, sig, exc, code, said):
    # PyTorch, interrupted while it builds a tensor from a checkpoint's buffer, swallows the KeyboardInterrupt and
    # raises "could not determine the shape of object type"; the loader then said the checkpoint was unreadable
    # (exit 2), once in CI. The handler remembers the signal, and the error that follows it is the signal's.
    import typer

    from deepspot.cli import signals
    from deepspot.cli.core import handle_errors
    from deepspot.errors import DeepSpotError

    exc = signals.Terminated if exc == "Terminated" else exc

    @handle_errors
    def infer():
        with contextlib.suppress(exc):  # what the C extension does with it
            signals.handler(exc)(sig, None)
        raise DeepSpotError("model.safetensors: not a readable .safetensors checkpoint (could not determine ...)")

    signals.forget()
    try:
        with pytest.raises(typer.Exit) as stopped:
            infer()
    finally:
        signals.forget()
    assert stopped.value.exit_code == code
    assert capsys.readouterr().err.splitlines() == [said]


def test_without_a_signal_the_error_is_the_users(capsys):
    import typer

    from deepspot.cli import signals
    from deepspot.cli.core import handle_errors
    from deepspot.errors import DeepSpotError

    @handle_errors
    def infer():
        raise DeepSpotError("model.safetensors: not a readable .safetensors checkpoint")

    signals.forget()
    with pytest.raises(typer.Exit) as failed:
        infer()
    assert failed.value.exit_code == 2
    assert capsys.readouterr().err.splitlines() == ["Error: model.safetensors: not a readable .safetensors checkpoint"]
