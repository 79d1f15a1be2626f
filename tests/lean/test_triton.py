"""Triton model repositories: written only after Triton's own schema parses the config and the ONNX graph agrees."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepspot.cli import app
from deepspot.errors import BackendUnavailableError, ConfigError, DeepSpotError
from deepspot.export.info import model_info
from deepspot.export.triton import triton_config_text, validate_config, write_triton_repository

DATA = Path(__file__).resolve().parents[1] / "data"
ONNX, INDEXED = DATA / "spot.onnx", DATA / "spot-indexed"

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (deepspot[triton])")
cli = CliRunner()


def parse(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def test_repository_layout_and_config(tmp_path):
    result = cli.invoke(app, ["triton", str(ONNX), str(tmp_path / "repo"), "--name", "deepspot_visium",
                              "--max-batch", "512", "--instances", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "repo" / "deepspot_visium"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == ONNX.read_bytes()
    c = parse(model_dir / "config.pbtxt")
    assert (c.name, c.backend, c.max_batch_size) == ("deepspot_visium", "onnxruntime", 512)
    assert [(i.name, pb2.DataType.Name(i.data_type), list(i.dims)) for i in c.input] == [
        ("spot", "TYPE_FP32", [1, 8]),
        ("subspot", "TYPE_FP32", [-1, 8]),
        ("neighbors", "TYPE_FP32", [-1, 8]),
    ]
    assert [(o.name, list(o.dims)) for o in c.output] == [("expression", [5])]
    assert list(c.dynamic_batching.preferred_batch_size) == [64, 128, 256, 512]
    (group,) = c.instance_group
    assert group.count == 2 and pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
    (warm,) = c.model_warmup
    assert warm.batch_size == 512
    assert {k: list(v.dims) for k, v in warm.inputs.items()} == {"spot": [1, 8], "subspot": [9, 8], "neighbors": [6, 8]}
    assert all(v.random_data for v in warm.inputs.values())
    assert not c.optimization.execution_accelerators.gpu_execution_accelerator
    meta = {k: v.string_value for k, v in c.parameters.items()}
    assert meta["deepspot.family"] == "spot" and meta["deepspot.mode"] == "subspot_neighbors"
    assert json.loads(meta["deepspot.genes"]) == ["G0", "G1", "G2", "G3", "G4"]
    assert json.loads(meta["deepspot.scaler"])["kind"] == "standard"


def test_tensorrt_accelerator_with_fp16_caches_and_profile(tmp_path):
    written = write_triton_repository(ONNX, tmp_path, max_batch=300, tensorrt=True, fp16=True)
    assert written.name == "spot"
    (accel,) = parse(written.config).optimization.execution_accelerators.gpu_execution_accelerator
    p = dict(accel.parameters)
    assert accel.name == "tensorrt" and p["precision_mode"] == "FP16"
    assert p["trt_engine_cache_enable"] == "true" and p["trt_timing_cache_enable"] == "true"
    assert p["trt_engine_cache_path"].endswith("/spot") and p["trt_timing_cache_path"] == p["trt_engine_cache_path"]
    assert p["trt_profile_min_shapes"] == "spot:1x1x8,subspot:1x1x8,neighbors:1x1x8"
    assert p["trt_profile_opt_shapes"] == "spot:300x1x8,subspot:300x9x8,neighbors:300x6x8"
    assert p["trt_profile_max_shapes"] == "spot:300x1x8,subspot:300x64x8,neighbors:300x64x8"


def test_cpu_instances_and_rewriting_a_model_replaces_it(tmp_path):
    write_triton_repository(ONNX, tmp_path, max_batch=8)
    (tmp_path / "spot" / "stale.txt").write_text("from before")
    written = write_triton_repository(ONNX, tmp_path, max_batch=8, kind="cpu")
    (group,) = parse(written.config).instance_group
    assert pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU"
    assert list(parse(written.config).dynamic_batching.preferred_batch_size) == [8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spot"]  # no staging folders left behind
    assert not (tmp_path / "spot" / "stale.txt").exists()


@pytest.mark.parametrize(
    "model, options, needle",
    [
        (INDEXED, {}, "indexed export"),
        (INDEXED / "head.onnx", {}, "whole slide"),
        (INDEXED / "encoder.onnx", {}, "per-item graph"),
        (ONNX, {"fp16": True}, "fp16 applies to tensorrt"),
        (ONNX, {"tensorrt": True, "kind": "cpu"}, "GPU instances"),
        (ONNX, {"kind": "tpu"}, "unknown instance kind"),
        (ONNX, {"max_batch": 0}, "max_batch must lie in 1..65536, got 0"),
        (ONNX, {"instances": 65}, "instances must lie in 1..64, got 65"),
        (ONNX, {"version": 0}, "the model version must be at least 1, got 0"),
        (ONNX, {"name": "a/b"}, "invalid Triton model name"),
        (DATA / "missing.onnx", {}, "no such ONNX file"),
    ],
)
def test_refusals_write_nothing(tmp_path, model, options, needle):
    with pytest.raises(DeepSpotError) as e:
        write_triton_repository(model, tmp_path / "repo", **options)
    assert needle in str(e.value)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    result = cli.invoke(app, ["triton", str(INDEXED), str(tmp_path / "repo")])
    assert result.exit_code == 2 and "serve the per-item graph" in result.output
    # Only the option that is wrong is named: the command has no version option to blame.
    result = cli.invoke(app, ["triton", str(ONNX), str(tmp_path / "repo"), "--max-batch", "0"])
    assert result.exit_code == 2 and result.output == "Error: --max-batch must lie in 1..65536, got 0\n"
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.replace('name: "subspot"', 'name: "subspots"'), "differ from the ONNX graph"),
        (lambda t: t.replace("dims: [ -1, 8 ]", "dims: [ -1, 9 ]", 1), "has dims"),
        (lambda t: t.replace("dims: [ 5 ]", "dims: [ -1, 5 ]"), "has dims"),
        (lambda t: t.replace("TYPE_FP32 dims: [ 1, 8 ]", "TYPE_FP16 dims: [ 1, 8 ]", 1), "TYPE_FP16"),
        (lambda t: t.replace("max_batch_size", "max_batch"), "not a valid Triton model configuration"),
        (lambda t: t.replace("KIND_GPU", "KIND_TPU"), "not a valid Triton model configuration"),
        (lambda t: t.replace("preferred_batch_size: [ 64, 128, 256 ]", "preferred_batch_size: [ 64, 128, 4096 ]"),
         "preferred batch sizes"),
        (lambda t: t.replace('"precision_mode"', '"precision"'), "does not take 'precision'"),
        (lambda t: t.replace("neighbors:1x1x8", "neighbors:1x1x9"), "trt_profile_min_shapes"),
        (lambda t: t.replace("dims: [ 6, 8 ] random_data", "dims: [ 6, 7 ] random_data"), "warm-up input"),
    ],
)
def test_validation_catches_what_the_graph_or_the_schema_refuses(edit, needle):
    graph = model_info(ONNX)
    text = triton_config_text(ONNX, "spot", max_batch=256, tensorrt=True, graph=graph)
    validate_config(text, graph)  # the generated text itself passes
    changed = edit(text)
    assert changed != text
    with pytest.raises(ConfigError) as e:
        validate_config(changed, graph)
    assert needle in str(e.value)


def test_without_tritonclient_nothing_is_written_and_the_install_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(BackendUnavailableError, match=r"deepspot\[triton\]"):
        write_triton_repository(ONNX, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
