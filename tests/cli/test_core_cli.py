"""What every command shares: an allocation that fails is one line and exit code 2, as a user's mistake is."""

from __future__ import annotations

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import deepspot.data
from deepspot.cli import app

from _cli import error_line

runner = CliRunner()


def _numpy_out_of_memory(*args, **kwargs):
    np.empty((1 << 40, 1 << 20), dtype=np.float32)  # NumPy's own MemoryError, with its own message


def _torch_out_of_memory(*args, **kwargs):
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 204800000000 bytes. Error code 12 (Cannot allocate memory)"
    )


@pytest.mark.parametrize(
    "fail, detail",
    [
        (_numpy_out_of_memory, "Unable to allocate"),
        (_torch_out_of_memory, "can't allocate memory: you tried to allocate 204800000000 bytes"),
    ],
)
def test_an_allocation_that_fails_is_one_line_and_exit_2(tmp_path, monkeypatch, fail, detail):
    monkeypatch.setattr(deepspot.data, "synth_bundle", fail)
    out = tmp_path / "b.npz"
    result = runner.invoke(app, ["synth", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0
    assert result.output.startswith("Error: not enough memory for this request (") and detail in result.output
    assert not out.exists()


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(deepspot.data, "synth_bundle", bug)
    result = runner.invoke(app, ["synth", str(tmp_path / "b.npz")])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_every_command_runs_with_errors_that_name_its_flags(tmp_path, capsys):
    from deepspot.cli.core import handle_errors
    from deepspot.errors import ConfigError, from_command_line, option

    seen = []

    @handle_errors
    def command() -> None:
        seen.append(from_command_line())
        raise ConfigError(f"{option('batch_size')} must be at least 1, got 0")

    with pytest.raises(typer.Exit):
        command()
    assert seen == [True] and not from_command_line()  # for the command's duration only
    assert capsys.readouterr().err == "Error: --batch-size must be at least 1, got 0\n"
    # A real command, whose check is the library's (synth_bundle's n_subspots, read as --subspots here).
    result = runner.invoke(app, ["synth", "--subspots", "0", "-o", str(tmp_path / "b.npz")])
    assert error_line(result) == "Error: --subspots must be at least 1, got 0"
