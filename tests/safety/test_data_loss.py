"""Untrusted or mistaken inputs never destroy data nor give silent wrong answers; each is one line, exit code 2.

Covers: an output that is an input, ``--no-clobber`` on every writing command, a full disk, a ``.npz`` member that
claims more rows than it stores, float64 values beyond float32's range, non-finite ONNX weights, crafted ONNX and
indexed-export metadata, unpaired indexed graphs, barcodes that are paths, huge bags and crafted plan headers.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import deepspot
from deepspot.cli import app
from deepspot.data import save_bundle, synth_bundle

from _cli import error_line

runner = CliRunner()
D, G = 6, 3


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A cell/neighbors model: checkpoint, dense ONNX export and indexed export."""
    root = tmp_path_factory.mktemp("models")
    model = deepspot.create_model("cell", "neighbors", input_size=D, output_size=G, phi2rho_size=4, n_ensemble=2)
    ckpt = deepspot.save(model, root / "model.safetensors")
    assert run("export", ckpt, "-o", root / "model.onnx").exit_code == 0
    assert run("export", ckpt, "--layout", "indexed", "-o", root / "indexed").exit_code == 0
    return {"ckpt": ckpt, "onnx": root / "model.onnx", "indexed": root / "indexed"}


@pytest.fixture()
def bundle(tmp_path) -> Path:
    return save_bundle(tmp_path / "cells.npz", synth_bundle("cell", "neighbors", 10, D, G, n_neighbors=4))


# -- an output that is an input, and --no-clobber --------------------------------------------------------------
def test_an_output_that_is_an_input_is_refused(tmp_path, models, bundle):
    before = bundle.read_bytes()
    error_line(run("infer", models["onnx"], "-i", bundle, "-o", bundle), "is an input of this run")
    assert bundle.read_bytes() == before
    os.link(bundle, tmp_path / "alias.npz")  # the same file under another name
    error_line(run("infer", models["onnx"], "-i", bundle, "-o", tmp_path / "alias.npz"), "is an input of this run")
    folder = save_bundle(tmp_path / "folder", synth_bundle("cell", "neighbors", 10, D, G, n_neighbors=4))
    error_line(run("infer", models["onnx"], "-i", folder, "-o", folder / "cell.npy"), "is an input of this run")
    assert np.load(folder / "cell.npy").shape == (10, D)
    assert bundle.read_bytes() == before and leftovers(tmp_path) == []


def test_no_command_writes_over_its_own_inputs_or_a_file_of_another_kind(tmp_path, models, bundle):
    """export, parity --report and bench --json refuse to write over what they read; a report must be .json, an
    export .onnx, a bundle .npz or a folder: a slip in a name never replaces a checkpoint, a model or a bundle."""
    import shutil

    ckpt = Path(shutil.copy(models["ckpt"], tmp_path / "m.safetensors"))
    onnx_file = Path(shutil.copy(models["onnx"], tmp_path / "m.onnx"))
    kept = {path: path.read_bytes() for path in (ckpt, onnx_file, bundle)}
    error_line(run("export", ckpt, "-o", ckpt), "must end in .onnx")
    error_line(run("export", ckpt, "-o", tmp_path / "model"), "must end in .onnx")
    os.link(onnx_file, tmp_path / "same.onnx")
    error_line(run("export", tmp_path / "same.onnx", "-o", onnx_file), "is an input of this run")
    error_line(run("parity", ckpt, onnx_file, "--random", "8", "--report", onnx_file), "--report writes a .json file")
    report = tmp_path / "r.json"
    os.link(bundle, report)
    error_line(run("parity", ckpt, onnx_file, "-i", report, "--report", report), "is an input of this run")
    error_line(run("bench", "--quick", "--json", ckpt), "--json writes a .json file")
    for target in ("x.h5ad", "x.txt"):
        refused = run("synth", "--family", "cell", "--n", "10", tmp_path / target)
        error_line(refused, "a bundle is a .npz file or a folder")
        assert not (tmp_path / target).exists()
    (tmp_path / "dir.npy").mkdir()
    error_line(run("infer", onnx_file, "-i", bundle, "-o", tmp_path / "dir.npy"), "dir.npy: is a directory")
    assert {path: path.read_bytes() for path in kept} == kept and leftovers(tmp_path) == []


def test_folders_are_written_with_the_permissions_of_any_new_folder(tmp_path, models):
    """Written in a private temporary folder, then renamed: the result must not stay private (0700), or a Triton
    server or a colleague on a shared cluster could not read it."""
    umask = os.umask(0o022)
    try:
        assert run("export", models["ckpt"], "--layout", "indexed", "-o", tmp_path / "indexed").exit_code == 0
        assert run("synth", "--family", "cell", "--n", "10", tmp_path / "bundle").exit_code == 0
        assert run("triton", models["onnx"], tmp_path / "repo", "--name", "m", "--kind", "cpu").exit_code == 0
    finally:
        os.umask(umask)
    for folder in (tmp_path / "indexed", tmp_path / "bundle", tmp_path / "repo" / "m"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder


def test_no_clobber_on_every_command_that_writes(tmp_path, models, bundle, reference_ckpt):
    cases = {
        "infer": (tmp_path / "p.npy", ["infer", models["onnx"], "-i", bundle, "-o"]),
        "import": (tmp_path / "m.safetensors", ["import", reference_ckpt, "-o"]),
        "export": (tmp_path / "m.onnx", ["export", models["ckpt"], "-o"]),
        "synth": (tmp_path / "s.npz", ["synth", "--family", "cell", "--n", "8", "-o"]),
        "train": (tmp_path / "run", ["train", "--data", bundle, "--family", "cell", "--mode", "neighbors",
                                     "--epochs", "1", "--no-progress", "--n-ensemble", "2", "--out"]),
    }  # fmt: skip
    for name, (out, args) in cases.items():
        target = out / "model.safetensors" if name == "train" else out
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"precious")
        error_line(run(*args, out, "--no-clobber"), "already exists", "--no-clobber")
        assert target.read_bytes() == b"precious", name
        result = run(*args, out)  # the default: replaced, as the help says
        assert result.exit_code == 0, (name, result.output)
        assert target.read_bytes() != b"precious", name
        assert "replace" in run(args[0], "--help").output, name
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def reference_ckpt():
    return Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference" / "cell_neighbors_max.ckpt"


# -- a full disk --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_not_enough_free_space_is_said_before_the_work(tmp_path, models, bundle, monkeypatch, suffix):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 100))
    out = tmp_path / f"p{suffix}"
    error_line(run("infer", models["onnx"], "-i", bundle, "-o", out), "not enough free space", "MiB free")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("layout", ["dense", "indexed"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, models, monkeypatch, layout):
    # A disk that fills up after the free-space check: the reserved blocks run out before anything is mapped.
    data = synth_bundle("cell", "neighbors", 10, D, G, n_neighbors=4)
    if layout == "indexed":
        data.pop("neighbors")
        data["neighbor_index"] = np.tile(np.arange(4), (10, 1))
    bundle = save_bundle(tmp_path / "b.npz", data)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    model = models["indexed"] if layout == "indexed" else models["onnx"]
    args = ["--table", "mmap"] if layout == "indexed" else []
    error_line(run("infer", model, "-i", bundle, "-o", tmp_path / "p.npz", *args), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz"]


# -- bundles that lie ---------------------------------------------------------------------------------------------
def test_a_npz_member_claiming_more_rows_than_it_stores(tmp_path, models):
    cells = np.ones((4, 1, D), np.float32)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (8, 1, D)})
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("cell.npy", header.getvalue() + cells.tobytes())  # 8 rows claimed, 4 stored
        z.writestr("neighbors.npy", _npy(np.full((8, 4, D), 7.0, np.float32)))
    error_line(run("infer", models["onnx"], "-i", path, "-o", tmp_path / "p.npy"),
               "'cell' claims shape (8, 1, 6)", "its member stores 96")  # fmt: skip
    assert not (tmp_path / "p.npy").exists()


@pytest.mark.parametrize("content", ["random", "objects"])
def test_an_array_file_that_is_not_numpy_data_never_gets_advice_to_unpickle(tmp_path, models, content):
    """NumPy says "load it unsafely using allow_pickle" for a file without its header or of Python objects: deepspot
    says what the file is instead, and names the file (a bundle folder's member, not just the folder)."""
    bad = os.urandom(4000) if content == "random" else _npy(np.array([{"a": 1}], dtype=object))
    folder = tmp_path / "cells"
    save_bundle(folder, synth_bundle("cell", "neighbors", 10, D, G, n_neighbors=4))
    (folder / "neighbors.npy").write_bytes(bad)
    (tmp_path / "expected.npy").write_bytes(bad)
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "a.npy").write_bytes(bad)
    (tmp_path / "obs.csv").write_text("barcode,x_pixel,y_pixel\na,1,2\n")
    runs = {
        "neighbors.npy": run("infer", models["onnx"], "-i", folder, "-o", tmp_path / "p.npy"),
        "expected.npy": run("parity", models["onnx"], "-i", save_bundle(tmp_path / "ok.npz", synth_bundle(
            "cell", "neighbors", 10, D, G, n_neighbors=4)), "--expected", tmp_path / "expected.npy"),
        "a.npy": run("bundle", "--features", tmp_path / "features", "--obs", tmp_path / "obs.csv", "--family",
                     "cell", "-o", tmp_path / "b.npz"),
    }  # fmt: skip
    for name, result in runs.items():
        line = error_line(result, name, "never unpickles")
        assert "allow_pickle" not in line and "pickle.load" not in line, line
    assert not (tmp_path / "p.npy").exists() and not (tmp_path / "b.npz").exists()


def _npy(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def test_float64_beyond_float32_range_is_named(tmp_path, models):
    data = synth_bundle("cell", "neighbors", 10, D, G, n_neighbors=4)
    data["neighbors"] = data["neighbors"].astype(np.float64)
    data["neighbors"][7, 2, 1] = 1e300  # finite in float64, inf once cast
    path = save_bundle(tmp_path / "wide.npz", data)
    error_line(run("infer", models["onnx"], "-i", path, "-o", tmp_path / "p.npy"),
               "'neighbors' holds a value beyond float32's range", "row 7")  # fmt: skip


def test_bags_are_capped_with_a_flag_to_raise_the_cap(tmp_path, models):
    path = save_bundle(tmp_path / "wide.npz", synth_bundle("cell", "neighbors", 3, D, G, n_neighbors=2000))
    error_line(run("infer", models["onnx"], "-i", path, "-o", tmp_path / "p.npy"), "bags of 2000 tiles", "--max-bag")
    assert run("infer", models["onnx"], "-i", path, "-o", tmp_path / "p.npy", "--max-bag", "2000").exit_code == 0


def test_barcodes_that_are_paths_are_refused(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    np.save(tmp_path / "outside.npy", np.ones((1, D), np.float32))
    for barcode in ("../outside", str(tmp_path / "outside")):
        csv = tmp_path / "obs.csv"
        csv.write_text(f"barcode,x_pixel,y_pixel\n{barcode},0,0\n")
        error_line(run("bundle", "--features", folder, "--obs", csv, "--family", "cell", "--k", "1", "-o",
                     tmp_path / "b.npz"), "is a path, not a file name")  # fmt: skip
    assert not (tmp_path / "b.npz").exists()


# -- model files that lie -----------------------------------------------------------------------------------------
def _edit_onnx(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst


def _set_meta(key: str, value: str):
    def edit(model):
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value
                return
        model.metadata_props.add(key=key, value=value)

    return edit


def test_a_nan_weight_in_an_onnx_file_is_named(tmp_path, models, bundle):
    def poison(model):
        init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(init).copy()
        values.flat[0] = np.nan
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))

    bad = _edit_onnx(models["onnx"], tmp_path / "nan.onnx", poison)
    error_line(run("infer", bad, "-i", bundle, "-o", tmp_path / "p.npy"), "holds NaN or infinite values")
    assert not (tmp_path / "p.npy").exists()


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("genes", json.dumps([1, 2, 3]), "gene names are not a list of strings"),
        ("genes", json.dumps(["a"]), "1 gene names for 3 outputs"),
        ("config", None, "output_size must be an integer from 1 to 1048576, got 1000000000000"),
        ("config", "[1, 2]", "incomplete deepspot metadata (no config)"),
        ("family", "tissue", "unknown family 'tissue'"),
        ("scaler", json.dumps({"kind": "standard", "offset": ["x"]}), "scaler's offset is not a list of finite numbers"),
        ("precision", "fp8", "unknown precision"),
        ("config", "[" * 100_000 + "]" * 100_000, "corrupt metadata 'config' (nested too deeply)"),
        ("optimize", "[" * 900 + "]" * 900, "corrupt metadata 'optimize' (nested too deeply)"),  # parses, then overflows
    ],
)
def test_crafted_onnx_metadata_is_one_line(tmp_path, models, bundle, key, value, needle):
    if value is None:  # a huge output_size in an otherwise valid config
        config = json.loads(next(p.value for p in onnx.load(str(models["onnx"])).metadata_props if p.key == "config"))
        value = json.dumps({**config, "output_size": 10**12})
    bad = _edit_onnx(models["onnx"], tmp_path / "bad.onnx", _set_meta(key, value))
    error_line(run("infer", bad, "-i", bundle, "-o", tmp_path / "p.npy"), needle)
    assert not (tmp_path / "p.npy").exists()


@pytest.mark.parametrize(
    "location, needle",
    [("ABSOLUTE", "should be a relative path"), ("../outside.bin", "points outside the directory"),
     ("link.bin", "is a symbolic link")],  # fmt: skip
    ids=["absolute", "dotdot", "symlink"],
)
def test_onnx_external_data_outside_the_model_folder_is_refused_and_named(tmp_path, models, bundle, location, needle):
    outside = tmp_path / "outside.bin"
    folder = tmp_path / "export"
    folder.mkdir()
    model = onnx.load(str(models["onnx"]))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    outside.write_bytes(b"\0" * len(weight.raw_data))
    (folder / "link.bin").symlink_to(outside)
    size = len(weight.raw_data)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    location = str(outside) if location == "ABSOLUTE" else location
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        weight.external_data.add(key=key, value=value)
    bad = folder / "model.onnx"
    onnx.save(model, str(bad))
    error_line(run("info", bad), "not a readable ONNX model", needle)
    error_line(run("infer", bad, "-i", bundle, "-o", tmp_path / "p.npy"), needle)
    assert not (tmp_path / "p.npy").exists()


def _indexed_copy(models, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "indexed"
    folder.mkdir()
    for name in ("encoder.onnx", "head.onnx"):
        _edit_onnx(models["indexed"] / name, folder / name, edit if name == "head.onnx" or edit is _no_pair else _same)
    return folder


def _same(model):
    pass


def _no_pair(model):
    kept = [p for p in model.metadata_props if p.key != "pair_id"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_no_pair, "has no pair_id"),
        (_set_meta("table_dtype", "int8"), "unknown table_dtype 'int8'"),
        (_set_meta("embedding_size", "16"), "metadata says embedding_size=16"),
        (_set_meta("embedding_size", "many"), "embedding_size must be an integer"),
    ],
)
def test_crafted_indexed_exports_are_one_line(tmp_path, models, edit, needle):
    data = synth_bundle("cell", "neighbors", 10, D, G, n_neighbors=4)
    data.pop("neighbors")
    data["neighbor_index"] = np.tile(np.arange(4), (10, 1))
    bundle = save_bundle(tmp_path / "b.npz", data)
    folder = _indexed_copy(models, tmp_path, edit)
    error_line(run("infer", folder, "-i", bundle, "-o", tmp_path / "p.npy"), needle)
    assert not (tmp_path / "p.npy").exists()


# -- crafted TensorRT plan headers ----------------------------------------------------------------------------------
MAGIC = b"DEEPSPOT-TRT-PLAN\n"
PROFILE = {key: {"cell": [1, 1, D]} for key in ("min", "opt", "max")}
MODEL = {"family": "cell", "mode": "cell", "config": {"input_size": D, "output_size": G}}


def _plan(header: bytes, length: int | None = None, tail: bytes = b"ENGINE") -> bytes:
    return MAGIC + struct.pack("<Q", len(header) if length is None else length) + header + tail


def _json(**fields) -> bytes:
    return json.dumps({"format_version": 1, "profile": PROFILE, "model": MODEL, **fields}).encode()


PLANS = {
    "empty after magic": MAGIC,
    "short length": MAGIC + b"\x01\x02",
    "length past the end": _plan(b"{}", length=10**6),
    "huge length": _plan(b"{}", length=2**63),
    "not json": _plan(b"\xff\xfe not json"),
    "a list": _plan(b"[1, 2, 3]"),
    "no profile": _plan(json.dumps({"format_version": 1}).encode()),
    "profile of strings": _plan(_json(profile={"min": "x", "opt": "y", "max": "z"})),
    "profile inputs differ": _plan(_json(profile={"min": {"a": [1]}, "opt": {"b": [1]}, "max": {"a": [1]}})),
    "model of wrong types": _plan(_json(model={"family": 3, "mode": [], "config": "x"})),
    "model with huge sizes": _plan(_json(model={**MODEL, "config": {"input_size": 10**15, "output_size": 3}})),
    "model genes not strings": _plan(_json(model={**MODEL, "genes": [1, 2, 3]})),
    "wrong format version": _plan(_json(format_version="one")),
    "deep nesting": _plan(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("case", list(PLANS))
def test_engine_info_on_crafted_plan_headers(tmp_path, case):
    path = tmp_path / "m.plan"
    path.write_bytes(PLANS[case])
    line = error_line(run("engine", "info", path))
    assert "m.plan" in line


def test_engine_info_on_a_well_formed_header(tmp_path):
    path = tmp_path / "m.plan"
    path.write_bytes(_plan(_json(gpu="NVIDIA H200")))
    result = run("engine", "info", path)
    assert result.exit_code == 0 and json.loads(result.output)["gpu"] == "NVIDIA H200"


def test_no_clobber_is_named_as_the_caller_gave_it(tmp_path, models, bundle):
    from deepspot.runtime import infer

    out = tmp_path / "p.npy"
    out.write_bytes(b"precious")
    with pytest.raises(deepspot.DeepSpotError) as e:
        infer(models["onnx"], bundle, out, no_clobber=True)
    assert str(e.value) == f"{out}: already exists, and no_clobber=True forbids replacing it"
    result = run("infer", models["onnx"], "-i", bundle, "-o", out, "--no-clobber")
    assert error_line(result) == f"Error: {out}: already exists, and --no-clobber forbids replacing it"
    assert out.read_bytes() == b"precious"
