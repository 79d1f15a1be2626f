"""``deepspot export --triton``: the export and its Triton model repository in one command."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from deepspot.cli import app

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (deepspot[triton])")
cli = CliRunner()
UNTRAINED = ["--family", "cell", "--mode", "neighbors", "--input-size", "6", "--output-size", "3",
             "--phi2rho-size", "4", "--n-ensemble", "2"]  # fmt: skip


def test_export_writes_the_onnx_file_and_a_validated_repository(tmp_path):
    out, repo = tmp_path / "cell.onnx", tmp_path / "models"
    result = cli.invoke(app, ["export", *UNTRAINED, "-o", str(out), "--triton", str(repo), "--name", "xenium",
                              "--max-batch", "64", "--tensorrt", "--fp16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "validated against Triton's model configuration schema" in result.output
    from google.protobuf import text_format

    config = text_format.Parse((repo / "xenium" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert [(i.name, list(i.dims)) for i in config.input] == [("cell", [1, 6]), ("neighbors", [-1, 6])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("expression", [3])]
    assert config.max_batch_size == 64 and config.parameters["deepspot.mode"].string_value == "neighbors"
    (accel,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.parameters["precision_mode"] == "FP16"
    assert (repo / "xenium" / "1" / "model.onnx").read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--layout", "indexed"], "serves the per-item graph"),
        (["--fp16"], "--fp16 applies to --tensorrt"),
        (["--max-batch", "0"], "Error: --max-batch must lie in 1..65536, got 0\n"),
        (["--instances", "0"], "Error: --instances must lie in 1..64, got 0\n"),
    ],
)
def test_bad_triton_options_are_refused_before_exporting(tmp_path, extra, needle):
    out = tmp_path / "cell.onnx"
    result = cli.invoke(app, ["export", *UNTRAINED, "-o", str(out), "--triton", str(tmp_path / "models"), *extra])
    assert result.exit_code == 2 and needle in result.output
    assert not out.exists() and not (tmp_path / "models").exists()


def test_a_triton_repository_that_cannot_be_written_is_refused_before_exporting(tmp_path):
    """A file given as --triton, a repository whose parent folder is missing, and an output whose stem is no model
    name were found after the export: the .onnx was left behind by a command that exited 2 (and a missing parent
    folder was made)."""
    out = tmp_path / "cell.onnx"
    afile = tmp_path / "afile"
    afile.write_text("x")
    for repo, extra, needle in [
        (afile, [], "exists and is not a folder; a Triton model repository is a folder"),
        (tmp_path / "nope" / "models", [], "does not exist (deepspot does not create parent folders)"),
    ]:
        result = cli.invoke(app, ["export", *UNTRAINED, "-o", str(out), "--triton", str(repo), *extra])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists() and not (tmp_path / "nope").exists()
    spaced = tmp_path / " cell.onnx"
    result = cli.invoke(app, ["export", *UNTRAINED, "-o", str(spaced), "--triton", str(tmp_path / "models")])
    assert result.exit_code == 2 and "invalid Triton model name" in result.output, result.output
    assert not spaced.exists() and not (tmp_path / "models").exists()
    result = cli.invoke(app, ["triton", str(out), str(tmp_path / "nope" / "models")])
    assert result.exit_code == 2 and not (tmp_path / "nope").exists()
