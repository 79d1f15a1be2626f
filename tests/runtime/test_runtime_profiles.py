"""TensorRT optimisation profiles, cache keys and the .plan header: pure code, tested without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from deepspot.errors import BackendUnavailableError, CheckpointError, ConfigError
from deepspot.runtime.base import ModelInfo, TensorSpec
from deepspot.runtime.profiles import (
    DEFAULT_BAG_RANGE,
    Profile,
    bag_sizes_of,
    cache_key,
    derive_profile,
    trt_profile_options,
)
from deepspot.runtime.trt import MAGIC, TrtRunner, plan_mismatches, read_plan_header, write_plan

SPECS = {
    "cell": TensorSpec("cell", ("batch", 1, 1536)),
    "neighbors": TensorSpec("neighbors", ("batch", "n_neighbors", 1536)),
}


def test_profile_from_batch_size_and_the_data_bag_sizes():
    p = derive_profile(SPECS, 1024, {"neighbors": 44})
    assert p.min == {"cell": (1, 1, 1536), "neighbors": (1, 44, 1536)}
    assert p.opt == {"cell": (1024, 1, 1536), "neighbors": (1024, 44, 1536)}
    assert p.max == p.opt
    assert p.covers({"cell": (7, 1, 1536), "neighbors": (7, 44, 1536)})
    assert not p.covers({"cell": (2048, 1, 1536), "neighbors": (2048, 44, 1536)})
    assert not p.covers({"cell": (7, 1, 1536), "neighbors": (7, 43, 1536)})


def test_profile_ranges_and_defaults():
    p = derive_profile(SPECS, 64, {"neighbors": (8, 44, 60)}, min_batch=16)
    assert (
        p.min["neighbors"] == (16, 8, 1536)
        and p.opt["neighbors"] == (64, 44, 1536)
        and p.max["neighbors"] == (64, 60, 1536)
    )
    p = derive_profile(SPECS, 64)
    lo, opt, hi = DEFAULT_BAG_RANGE
    assert (p.min["neighbors"][1], p.opt["neighbors"][1], p.max["neighbors"][1]) == (lo, opt, hi)
    assert p.min["cell"] == (1, 1, 1536)  # a fixed axis stays fixed
    for bad in ({"neighbors": (9, 4, 20)}, {"neighbors": (0, 4, 20)}, {"neighbors": (1, 2)}):
        with pytest.raises(ConfigError, match="bag size range"):
            derive_profile(SPECS, 64, bad)
    with pytest.raises(ConfigError, match="min batch"):
        derive_profile(SPECS, 0)
    with pytest.raises(ConfigError, match="min batch"):
        derive_profile(SPECS, 8, min_batch=9)


def test_profile_as_provider_option_strings():
    options = trt_profile_options(derive_profile(SPECS, 32, {"neighbors": 44}))
    assert options == {
        "trt_profile_min_shapes": "cell:1x1x1536,neighbors:1x44x1536",
        "trt_profile_opt_shapes": "cell:32x1x1536,neighbors:32x44x1536",
        "trt_profile_max_shapes": "cell:32x1x1536,neighbors:32x44x1536",
    }


def test_bag_sizes_of_data():
    data = {"spot": np.zeros((5, 1, 4)), "subspot": np.zeros((5, 9, 4)), "barcode": np.zeros(5)}
    assert bag_sizes_of(data) == {"spot": 1, "subspot": 9}


@pytest.mark.parametrize("family, mode, bag, arrays", [
    ("spot", "spot", "spot", {"spot": (10, 100, 8)}),  # the spot mode's bag of spot tiles
    ("cell", "neighbors", "neighbors", {"cell": (10, 8), "neighbor_index": (10, 80)}),  # bags gathered per batch
    ("spot", "subspot_neighbors", "subspot", {"spot": (10, 8), "subspot": (10, 70, 8), "neighbors": (10, 3, 8)}),
])  # fmt: skip
def test_infer_pins_the_profile_to_every_bag_of_the_data(tmp_path, family, mode, bag, arrays):
    """The TensorRT profile of a per-item graph covers the bags `infer` feeds it; the spot mode's bag and the
    neighbours of an indexed bundle got the default range (up to 64 tiles), outside which TensorRT refuses a batch."""
    from deepspot import create_model
    from deepspot.export import export_onnx
    from deepspot.runtime.artifacts import read_onnx
    from deepspot.runtime.backends import _profile
    from deepspot.runtime.infer import ModelSession, infer

    rng = np.random.default_rng(0)
    data = {k: rng.integers(-1, 10, s) if k == "neighbor_index" else rng.standard_normal(s, dtype=np.float32)
            for k, s in arrays.items()}  # fmt: skip
    np.savez(tmp_path / "slide.npz", **data)
    model = create_model(family, mode, input_size=8, output_size=3, phi2rho_size=4, n_ensemble=3)
    onnx = export_onnx(model, tmp_path / "m.onnx", validate=False).path
    with ModelSession(onnx, "ort-cpu") as session:
        infer(onnx, tmp_path / "slide.npz", tmp_path / "p.npy", layout="dense", session=session)
        profile = _profile(read_onnx(onnx)[1], session.options)
    size = arrays["neighbor_index"][1] if "neighbor_index" in arrays else arrays[bag][1]
    assert profile.min[bag][1] == profile.opt[bag][1] == profile.max[bag][1] == size
    shapes = {b.name: (256, 1 if b.single else (size if b.name == bag else arrays[b.name][1]), 8)
              for b in model.mode.bags}  # fmt: skip
    assert profile.covers(shapes)


def test_cache_key_is_stable_and_sensitive():
    base = dict(onnx="abc", profile=derive_profile(SPECS, 64, {"neighbors": 44}).to_dict(), precision="fp16")
    assert cache_key(**base) == cache_key(**dict(reversed(list(base.items()))))
    assert len(cache_key(**base)) == 16
    for key, value in (("onnx", "abd"), ("precision", "fp32"), ("profile", derive_profile(SPECS, 65).to_dict())):
        assert cache_key(**{**base, key: value}) != cache_key(**base)


def test_plan_header_round_trip_and_checks(tmp_path):
    info = ModelInfo("cell", "neighbors", 1536, 500, genes=["a"] * 500)
    profile = derive_profile(SPECS, 64, {"neighbors": 44})
    header = {
        "onnx_sha256": "f00",
        "gpu": "NVIDIA H200",
        "compute_capability": "9.0",
        "tensorrt_version": "10.3.0",
        "precision": "fp16",
        "profile": profile.to_dict(),
        "model": info.to_dict(),
        "input_dtypes": {"cell": "float32", "neighbors": "float32"},
    }
    path = write_plan(tmp_path / "m.plan", b"ENGINE-BYTES", header)
    assert path.read_bytes().startswith(MAGIC) and path.read_bytes().endswith(b"ENGINE-BYTES")
    read, offset = read_plan_header(path)
    assert read["gpu"] == "NVIDIA H200" and read["format_version"] == 1
    assert path.read_bytes()[offset:] == b"ENGINE-BYTES"

    here = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "10.3.0", "onnx_sha256": "f00"}
    assert plan_mismatches(read, here) == []
    problems = plan_mismatches(read, {**here, "compute_capability": "8.0", "tensorrt_version": "10.5.0"})
    assert len(problems) == 2 and "compute_capability: engine built for '9.0', here '8.0'" in problems[0]
    assert plan_mismatches(read, {"onnx_sha256": None}) == []  # unknown on this side: not checked

    # The runner reads the header (metadata, input specs from the profile) without TensorRT; only activate needs it.
    runner = TrtRunner(path)
    assert runner.info.family == "cell" and runner.info.output_size == 500
    specs = runner.get_input_metadata()
    assert specs["neighbors"].shape == (None, 44, 1536) and specs["cell"].shape == (None, 1, 1536)
    assert runner.device == "cuda:0" and runner.output_names == ("expression",)
    assert isinstance(runner.profile, Profile) and runner.profile.max["cell"] == (64, 1, 1536)


def test_plan_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such engine"):
        read_plan_header(tmp_path / "missing.plan")
    (tmp_path / "foreign.plan").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a deepspot TensorRT plan"):
        read_plan_header(tmp_path / "foreign.plan")
    (tmp_path / "bad.plan").write_bytes(MAGIC + (5).to_bytes(8, "little") + b"{{{{{")
    with pytest.raises(CheckpointError, match="corrupt plan header"):
        read_plan_header(tmp_path / "bad.plan")


def test_engine_build_needs_tensorrt(artifacts, tmp_path):
    import importlib.util  # the positive path is the tensorrt-marked GPU test

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    from deepspot.runtime.trt import engine_from_onnx

    with pytest.raises(BackendUnavailableError, match=r"pip install 'deepspot\[tensorrt\]'"):
        engine_from_onnx(artifacts().onnx, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()
