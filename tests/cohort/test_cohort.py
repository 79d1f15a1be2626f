"""Cohorts: many slides in one command, resumable, sharded, per-device workers, failures isolated."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import deepspot
from deepspot.cli import app
from deepspot.data import save_bundle, synth_bundle
from deepspot.fileio import host_tag
from deepspot.runtime.cohort import in_shard, plan_slides

runner = CliRunner()
D, G = 8, 4


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort-model")
    m = deepspot.create_model("cell", "neighbors", input_size=D, output_size=G, phi2rho_size=4, n_ensemble=2)
    m.genes = [f"g{i}" for i in range(G)]
    ckpt = deepspot.save(m, root / "model.safetensors")
    assert run("export", ckpt, "-o", root / "model.onnx").exit_code == 0
    return root / "model.onnx"


def make_slides(folder: Path, names=("s1", "s2", "s3"), n=12) -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [save_bundle(folder / f"{name}.npz", synth_bundle("cell", "neighbors", n + i, D, G, seed=i, n_neighbors=3))
            for i, name in enumerate(names)]  # fmt: skip


def record(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "cohort.json").read_text())["slides"]}


def test_a_cohort_writes_one_output_per_slide_and_equals_single_runs(tmp_path, model):
    slides = make_slides(tmp_path / "in")
    out = tmp_path / "out"
    result = run("infer", model, "--input", *slides, "--output-dir", out, "--format", "npz")
    assert result.exit_code == 0, result.output
    assert "3 done, 0 skipped, 0 failed" in result.output
    for slide in slides:
        single = tmp_path / f"{slide.stem}-single.npz"
        assert run("infer", model, "-i", slide, "-o", single).exit_code == 0
        a, b = np.load(out / f"{slide.stem}.npz"), np.load(single)
        np.testing.assert_array_equal(a["predictions"], b["predictions"])
    rec = record(out)
    assert [rec[s]["status"] for s in ("s1", "s2", "s3")] == ["done"] * 3
    assert rec["s2"]["items"] == 13 and rec["s1"]["model_sha256"] == deepspot.checkpoint.file_hash(model)


def test_resume_skips_what_is_up_to_date_and_redoes_what_changed(tmp_path, model):
    slides = make_slides(tmp_path / "in")
    out = tmp_path / "out"
    assert run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy").exit_code == 0
    first = {s: (out / f"{s}.npy").stat().st_mtime_ns for s in ("s1", "s2", "s3")}
    # A killed run: s2's output is gone (only whole outputs are ever left), s3's input changed since.
    (out / "s2.npy").unlink()
    save_bundle(slides[2], synth_bundle("cell", "neighbors", 20, D, G, seed=9, n_neighbors=3))
    result = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy")
    assert result.exit_code == 0, result.output
    rec = record(out)
    assert [rec[s]["status"] for s in ("s1", "s2", "s3")] == ["skipped", "done", "done"]
    assert (out / "s1.npy").stat().st_mtime_ns == first["s1"]
    assert np.load(out / "s3.npy").shape == (20, G)
    forced = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy", "--force")
    assert "3 done, 0 skipped" in forced.output
    # --verify compares contents: a record made without it has no hashes, so the first --verify run redoes.
    args = ("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy", "--verify")
    assert "3 done, 0 skipped" in run(*args).output
    assert "0 done, 3 skipped" in run(*args).output
    os.utime(slides[0], ns=(1, 1))  # same bytes, other mtime: still up to date by content
    assert "0 done, 3 skipped" in run(*args).output
    # An output cut short since it was written (a machine crash before the data reached the disk) is redone.
    with open(out / "s1.npy", "r+b") as f:
        f.truncate(64)
    result = run(*args)
    assert "1 done, 2 skipped" in result.output and record(out)["s1"]["status"] == "done"
    assert np.load(out / "s1.npy").shape == (12, G) and record(out)["s1"]["output_bytes"] == (out / "s1.npy").stat().st_size


def test_resume_redoes_slides_made_with_other_value_settings(tmp_path):
    """An output on the standardised scale is not up to date for --inverse-transform (nor fp32 for --precision fp16);
    a run with the same settings again skips, and a record from before slides carried their settings uses its own."""
    from deepspot.scaler import Scaler

    m = deepspot.create_model("cell", "neighbors", input_size=D, output_size=G, phi2rho_size=4, n_ensemble=2)
    m.scaler = Scaler("standard", np.arange(G, dtype=np.float64), np.full(G, 3.0))
    model = tmp_path / "scaled.onnx"
    assert run("export", deepspot.save(m, tmp_path / "scaled.safetensors"), "-o", model).exit_code == 0
    slides = make_slides(tmp_path / "in")
    out = tmp_path / "out"
    args = ("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy")
    assert "3 done, 0 skipped" in run(*args).output
    standardised = np.load(out / "s1.npy")
    assert "3 done, 0 skipped" in run(*args, "--inverse-transform").output
    np.testing.assert_allclose(np.load(out / "s1.npy"), standardised * 3 + np.arange(G), rtol=1e-5, atol=1e-5)
    assert "0 done, 3 skipped" in run(*args, "--inverse-transform").output
    assert record(out)["s1"]["settings"]["inverse_transform"] is True
    # A record written before slides had their own settings: the record's settings stand for each slide.
    data = json.loads((out / "cohort.json").read_text())
    for s in data["slides"]:
        del s["settings"]
    (out / "cohort.json").write_text(json.dumps(data))
    assert "0 done, 3 skipped" in run(*args, "--inverse-transform").output
    assert "3 done, 0 skipped" in run(*args).output


def test_a_failing_slide_does_not_stop_the_others(tmp_path, model):
    slides = make_slides(tmp_path / "in")
    bad = tmp_path / "in" / "broken.npz"
    bad.write_bytes(b"not a bundle")
    wrong = save_bundle(tmp_path / "in" / "wide.npz", synth_bundle("cell", "neighbors", 5, D + 1, G, n_neighbors=3))
    result = run("infer", model, "-i", slides[0], bad, wrong, slides[1], "--output-dir", tmp_path / "out",
                 "--format", "npz")  # fmt: skip
    assert result.exit_code == 1
    rec = record(tmp_path / "out")
    assert rec["broken"]["status"] == "failed" and "not a .npz bundle" in rec["broken"]["error"]
    assert rec["wide"]["status"] == "failed" and "has 9 features, the model expects 8" in rec["wide"]["error"]
    assert rec["s1"]["status"] == rec["s2"]["status"] == "done"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cohort.json", "s1.npz", "s2.npz"]


def test_shards_cover_every_slide_exactly_once(tmp_path, model):
    names = [f"slide{i:02d}" for i in range(12)]
    slides = make_slides(tmp_path / "in", names, n=4)
    out = tmp_path / "out"
    out.mkdir()  # the cohort makes its --output-dir, not the folder above it
    for i in range(3):
        result = run("infer", model, "-i", *slides, "--output-dir", out / str(i), "--format", "npy", "--shard", f"{i}/3")
        assert result.exit_code == 0, result.output
    done = [p.stem for i in range(3) for p in (out / str(i)).glob("*.npy")]
    assert sorted(done) == names  # each exactly once
    assert all(sum(in_shard(n, (i, 3)) for i in range(3)) == 1 for n in names)
    assert run("infer", model, "-i", *slides, "--output-dir", out, "--shard", "3/3").exit_code == 2


def test_shards_sharing_a_folder_keep_their_own_records_and_resume(tmp_path, model):
    """Shard jobs writing into one folder (the README's example) each keep a record of their own, so none overwrites
    another's, and a shard run again skips what any record says is done."""
    names = [f"slide{i:02d}" for i in range(8)]
    slides = make_slides(tmp_path / "in", names, n=4)
    out = tmp_path / "out"
    for i in range(2):
        result = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy", "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
        assert f"cohort.shard-{i}-of-2.json" in result.output.replace("\n", "")
    records = sorted(p.name for p in out.glob("cohort*.json"))
    assert records == ["cohort.shard-0-of-2.json", "cohort.shard-1-of-2.json"]
    again = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy", "--shard", "0/2")
    mine = sum(in_shard(n, (0, 2)) for n in names)
    assert f"0 done, {mine} skipped" in again.output
    whole = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy")  # no shard: reads both records
    assert "0 done, 8 skipped" in whole.output and (out / "cohort.json").is_file()


def test_a_backend_error_fails_its_slide_only(tmp_path, model, monkeypatch):
    """An error that is not deepspot's own (onnxruntime's, CUDA running out of memory) fails the slide it happened
    on, with its first line, and the cohort goes on."""
    import importlib

    from deepspot.runtime import cohort

    infer = importlib.import_module("deepspot.runtime.infer")  # the module (the package exports the function)
    real = infer.infer

    def flaky(model, bundle, *args, **kwargs):
        if Path(bundle).stem == "s2":
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code\nstack trace...")
        return real(model, bundle, *args, **kwargs)

    monkeypatch.setattr(infer, "infer", flaky)
    slides = make_slides(tmp_path / "in")
    result = cohort.run_cohort(model, cohort.plan_slides(slides, None, tmp_path / "out", "npy"), tmp_path / "out")
    status = {s.name: s for s in result.slides}
    assert status["s1"].status == status["s3"].status == "done"
    assert status["s2"].status == "failed"
    assert status["s2"].error == "RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code"


def test_an_interrupt_a_library_swallowed_stops_the_cohort_instead_of_failing_its_slide(tmp_path, model, monkeypatch):
    """PyTorch, interrupted while it reads a checkpoint, raises its own ValueError instead of the KeyboardInterrupt:
    the slide must not be recorded as failed with the cohort going on to the next one. The handler noted the signal,
    and the cohort stops with it."""
    import importlib

    from deepspot import interrupts
    from deepspot.runtime import cohort

    infer = importlib.import_module("deepspot.runtime.infer")
    real, ran = infer.infer, []

    def interrupted(model, bundle, *args, **kwargs):
        ran.append(Path(bundle).stem)
        if Path(bundle).stem == "s2":
            interrupts.note(KeyboardInterrupt)  # what the CLI's handler does, before it raises in the main thread
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
        return real(model, bundle, *args, **kwargs)

    monkeypatch.setattr(infer, "infer", interrupted)
    slides = make_slides(tmp_path / "in")
    try:
        with pytest.raises(KeyboardInterrupt):
            cohort.run_cohort(model, cohort.plan_slides(slides, None, tmp_path / "out", "npy"), tmp_path / "out")
    finally:
        interrupts.forget()
    assert ran == ["s1", "s2"]  # s3 never started
    assert not (tmp_path / "out" / "s2.npy").exists()


@pytest.mark.parametrize("devices, options, message", [
    ("bogus", [], "--devices: 'bogus' is neither a GPU index (0, 1, ...) nor cpu"),
    ("0,1", [], "names GPUs, but backend 'ort-cpu' runs on the CPU"),
    ("cpu,cpu", ["--backend", "ort-cuda"], "backend 'ort-cuda' runs on a GPU, so give GPU indices only"),
    ("0,1", ["--backend", "ort-cuda"], "backend 'ort-cuda' needs"),  # no GPU here: said once, not once per slide
    (None, ["--inverse-transform"], "the model has no scaler, so there is no original scale to map back to"),
])
def test_a_cohort_setup_that_fails_every_slide_is_refused_up_front(tmp_path, model, devices, options, message):
    slides = make_slides(tmp_path / "in", ["a", "b"])
    options = options + (["--devices", devices] if devices else [])
    result = run("infer", model, "-i", *slides, "--output-dir", tmp_path / "out", *options)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_backend_a_cohort_cannot_run_is_not_told_to_use_allow_fallback(tmp_path, model):
    # a cohort refuses --allow-fallback, so its refusal of a backend must not suggest it
    slides = make_slides(tmp_path / "in", ["a", "b"])
    result = run("infer", model, "-i", *slides, "--output-dir", tmp_path / "out", "--backend", "ort-cuda")
    assert result.exit_code == 2 and "backend 'ort-cuda' needs" in result.output, result.output
    assert "--allow-fallback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_manifest_with_names_outputs_and_relative_paths(tmp_path, model):
    make_slides(tmp_path / "in")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide,input,output\nA,in/s1.npz,\nB,in/s2.npz,custom/b.npy\n")
    (tmp_path / "custom").mkdir()
    result = run("infer", model, "--manifest", manifest, "--output-dir", tmp_path / "out", "--format", "npz")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "A.npz").is_file() and (tmp_path / "custom" / "b.npy").is_file()
    dup = tmp_path / "dup.csv"
    dup.write_text("slide,input\nA,in/s1.npz\nA,in/s2.npz\n")
    assert "appears twice" in run("infer", model, "--manifest", dup, "--output-dir", tmp_path / "o2").output
    # a row's output folder that does not exist is refused before any slide runs, not when that slide's turn comes
    typo = tmp_path / "typo.csv"
    typo.write_text("slide,input,output\nA,in/s1.npz,\nB,in/s2.npz,cusotm/b.npy\n")
    result = run("infer", model, "--manifest", typo, "--output-dir", tmp_path / "o3", "--format", "npz")
    assert result.exit_code == 2 and "the output folder of slide 'B' does not exist" in result.output, result.output
    assert not (tmp_path / "o3").exists()


def test_one_worker_per_device(tmp_path, model):
    slides = make_slides(tmp_path / "in", [f"w{i}" for i in range(4)], n=6)
    out = tmp_path / "out"
    result = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy", "--devices", "cpu,cpu")
    assert result.exit_code == 0, result.output
    rec = record(out)
    assert all(rec[f"w{i}"]["status"] == "done" for i in range(4))
    single = tmp_path / "w0.npy"
    assert run("infer", model, "-i", slides[0], "-o", single).exit_code == 0
    np.testing.assert_array_equal(np.load(out / "w0.npy"), np.load(single))


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, model):
    slides = make_slides(tmp_path / "in", ["s1"])
    out = tmp_path / "out"
    out.mkdir()
    dead = 2**22 + 12345  # no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    here = host_tag()
    stale = [out / f".predictions.pid{dead}-{here}.abc.tmp.npy", out / f".s1.npz.pid{dead}-{here}.y.tmp.npz",
             out / f".deepspot-embeddings.pid{dead}-{here}.x.tmp.npy"]  # fmt: skip
    alive = out / f".predictions.pid{os.getppid()}-{here}.abc.tmp.npy"  # a run still writing: kept
    # A run on another machine sharing the folder (a cluster's file system): its process id means nothing here, so
    # its file is kept even though no process here has that id.
    elsewhere = out / f".s2.npz.pid{dead}-{'0' * 8 if here != '0' * 8 else '1' * 8}.z.tmp.npz"
    for p in stale + [alive, elsewhere]:
        p.write_bytes(b"x" * 100)
    assert run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npz").exit_code == 0
    assert not any(p.exists() for p in stale) and alive.exists() and elsewhere.exists()


def test_plan_refuses_unclear_requests(tmp_path):
    from deepspot.errors import ConfigError, InputError

    with pytest.raises(ConfigError, match=r"^give the slides either as inputs=\['A.npz', 'B.npz', ...\] or as "
                                          "manifest='slides.csv'$"):  # fmt: skip
        plan_slides([], None, tmp_path)
    with pytest.raises(ConfigError, match="unknown output format"):
        plan_slides([tmp_path / "a.npz"], None, tmp_path, "csv")
    with pytest.raises(InputError, match="appears twice"):
        plan_slides([tmp_path / "a" / "x.npz", tmp_path / "b" / "x.npz"], None, tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--allow-fallback"], "--allow-fallback is for one bundle (-o), not a cohort"),
    (["--device", "1"], "--device is for one bundle (-o), not a cohort; a cohort's workers take --devices"),
    (["--compile"], "--compile is for one bundle (-o), not a cohort"),
])
def test_options_a_cohort_does_not_take_are_refused_not_ignored(tmp_path, model, extra, message):
    slides = make_slides(tmp_path / "in", ["a", "b"])
    result = run("infer", model, "-i", *slides, "--output-dir", tmp_path / "out", *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--format", "npz"], "--format is for a cohort (--output-dir), not one bundle with -o (-o's suffix says"),
    (["--shard", "0/2"], "--shard is for a cohort (--output-dir), not one bundle with -o"),
    (["--devices", "cpu,cpu"], "--devices is for a cohort"),
])
def test_cohort_options_with_one_bundle_are_refused_not_ignored(tmp_path, model, extra, message):
    slides = make_slides(tmp_path / "in", ["a"])
    result = run("infer", model, "-i", slides[0], "-o", tmp_path / "p.npy", *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "p.npy").exists()


def test_shard_and_batch_size_messages_name_what_is_wrong(tmp_path, model):
    from deepspot.errors import ConfigError
    from deepspot.runtime import infer
    from deepspot.runtime.cohort import parse_shard

    with pytest.raises(ConfigError, match="^shard='1/0': N \\(the number of shards\\) must be at least 1, got 0$"):
        parse_shard("1/0")
    with pytest.raises(ConfigError, match="^shard='3/3': I must lie in 0..2, got 3$"):
        parse_shard("3/3")
    with pytest.raises(ConfigError, match="^shard takes I/N with integers, such as 0/4; got 'half'$"):
        parse_shard("half")
    slide = make_slides(tmp_path / "in", ["a"])[0]
    with pytest.raises(ConfigError, match="^batch_size must be at least 1, got 0$"):
        infer(model, slide, tmp_path / "p.npy", batch_size=0)  # 0 is not "the default" from Python either
    assert not (tmp_path / "p.npy").exists()


# -- the journal: one line per slide, the whole record only at the start and the end ---------------------------------
KILLED_ON_S3 = """
import importlib, os, signal, sys
from pathlib import Path
from deepspot.runtime.cohort import plan_slides, run_cohort

infer = importlib.import_module("deepspot.runtime.infer")
real = infer.infer

def killed_on_s3(model, bundle, *args, **kwargs):
    if Path(bundle).stem == "s3":
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up runs, as when a scheduler or the OOM killer kills a job
    return real(model, bundle, *args, **kwargs)

infer.infer = killed_on_s3
model, out, *slides = sys.argv[1:]
run_cohort(model, plan_slides(slides, None, out, "npy"), out)
"""


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_run_leaves_a_journal_and_the_next_resumes_from_it(tmp_path, model):
    import signal
    import subprocess
    import sys

    slides = make_slides(tmp_path / "in")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLED_ON_S3, model, out, *slides], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # What the killed run left: the record written at its start (nothing was up to date) and one line per slide it
    # finished; the slide in progress (s3) is neither recorded nor written.
    assert json.loads((out / "cohort.json").read_text())["slides"] == []
    assert [(s["name"], s["status"]) for s in journal_lines(out / "cohort.journal.jsonl")] == [("s1", "done"),
                                                                                              ("s2", "done")]
    assert sorted(p.name for p in out.glob("*.npy")) == ["s1.npy", "s2.npy"]
    first = {s: (out / f"{s}.npy").stat().st_mtime_ns for s in ("s1", "s2")}
    result = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy")
    assert result.exit_code == 0, result.output
    assert "1 done, 2 skipped, 0 failed" in result.output
    rec = record(out)
    assert [rec[s]["status"] for s in ("s1", "s2", "s3")] == ["skipped", "skipped", "done"]
    assert {s: (out / f"{s}.npy").stat().st_mtime_ns for s in ("s1", "s2")} == first
    assert not (out / "cohort.journal.jsonl").exists()


def test_a_journal_line_cut_short_by_a_kill_is_ignored(tmp_path, model):
    from deepspot.runtime.cohort import read_record

    slides = make_slides(tmp_path / "in")
    out = tmp_path / "out"
    assert run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy").exit_code == 0
    s1, s2, s3 = json.loads((out / "cohort.json").read_text())["slides"]
    # As a kill while s3's line was written leaves them: the record of the start, two whole lines and half a third.
    (out / "cohort.json").write_text(json.dumps({"settings": {}, "slides": []}))
    (out / "cohort.journal.jsonl").write_text(json.dumps(s1) + "\n" + json.dumps(s2) + "\n" + json.dumps(s3)[:40])
    assert read_record(out) == {"s1": s1, "s2": s2}
    result = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy")
    assert result.exit_code == 0, result.output
    assert "1 done, 2 skipped, 0 failed" in result.output
    assert not (out / "cohort.journal.jsonl").exists()


def test_a_record_or_journal_nested_too_deeply_counts_as_none(tmp_path, model):
    from deepspot.runtime.cohort import read_record

    slides = make_slides(tmp_path / "in", names=("s1",))
    out = tmp_path / "out"
    out.mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    (out / "cohort.json").write_text(deep)
    (out / "cohort.journal.jsonl").write_text(deep + "\n")
    assert read_record(out) == {}
    result = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy")
    assert result.exit_code == 0, result.output
    assert "1 done, 0 skipped, 0 failed" in result.output


def test_journals_are_newer_than_their_own_record_and_the_latest_file_wins_across_shards(tmp_path):
    from deepspot.runtime.cohort import read_record

    def slide(name, status):
        return {"name": name, "status": status}

    def write(name, text, when):
        (tmp_path / name).write_text(text)
        os.utime(tmp_path / name, ns=(when, when))

    # Shard 0's journal has an older time than its record (a clock, a copy), and still holds what came after it.
    write("cohort.shard-0-of-2.json", json.dumps({"slides": [slide("a", "failed"), slide("b", "failed")]}), 200)
    write("cohort.shard-0-of-2.journal.jsonl", json.dumps(slide("a", "done")) + "\n" + json.dumps(slide("c", "done")),
          100)  # fmt: skip
    write("cohort.shard-1-of-2.json", json.dumps({"slides": [slide("c", "failed")]}), 300)  # written later: wins
    write("cohort.json", json.dumps({"slides": [slide("d", "done")]}), 50)
    (tmp_path / "cohort.journal.jsonl").mkdir()  # unreadable: counts as none
    found = read_record(tmp_path)
    assert {name: s["status"] for name, s in found.items()} == {"a": "done", "b": "failed", "c": "failed", "d": "done"}


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]])
def test_each_slide_appends_one_flushed_line_and_the_record_is_written_twice(tmp_path, model, monkeypatch, devices):
    """O(N): the whole record is written at the start and at the end only, whatever the number of slides; in between
    each slide adds one line to the journal, on disk before the next slide starts. With workers, only the parent
    writes (a line each, not one per worker)."""
    from deepspot.runtime import cohort

    n = 24 if devices is None else 6
    (tmp_path / "in").mkdir()
    for i in range(n):
        (tmp_path / "in" / f"bad{i:02d}.npz").write_bytes(b"not a bundle")  # fails fast
    out = tmp_path / "out"
    real, written = cohort.write_record, []

    def counted(*args, **kwargs):
        path = real(*args, **kwargs)
        written.append(path.stat().st_size)
        return path

    monkeypatch.setattr(cohort, "write_record", counted)
    journal, lines = out / "cohort.journal.jsonl", []
    plan = cohort.plan_slides(sorted((tmp_path / "in").iterdir()), None, out, "npy")
    result = cohort.run_cohort(model, plan, out, devices=devices,
                               on_status=lambda s: lines.append(journal_lines(journal) if journal.exists() else []))
    assert result.counts() == {"done": 0, "skipped": 0, "failed": n}
    assert len(written) == 2 and sum(written) < 2 * (out / "cohort.json").stat().st_size
    assert [len(seen) for seen in lines] == list(range(1, n + 1))  # one more line after every slide, on disk
    assert {s["name"] for s in lines[-1]} == {s.name for s in plan}
    assert not journal.exists()


def test_the_final_record_holds_the_journal_in_the_record_s_schema(tmp_path, model):
    from dataclasses import fields

    from deepspot.runtime import cohort

    slides = make_slides(tmp_path / "in")
    slides[2].write_bytes(b"not a bundle")
    out = tmp_path / "out"
    assert run("infer", model, "-i", slides[0], "--output-dir", out, "--format", "npy").exit_code == 0
    journal, seen = out / "cohort.shard-0-of-1.journal.jsonl", []
    result = cohort.run_cohort(model, cohort.plan_slides(slides, None, out, "npy"), out, shard=(0, 1),
                               on_status=lambda s: seen.append(journal_lines(journal) if journal.exists() else None))
    data = json.loads(result.record.read_text())
    assert result.record.read_text() == json.dumps(data, indent=1)
    assert result.record == out / "cohort.shard-0-of-1.json" and not journal.exists()
    assert set(data) == {"settings", "slides"}
    assert set(data["settings"]) == {"model", "model_sha256", "shard", "verify"} | {
        f.name for f in fields(cohort.CohortSettings)}  # fmt: skip
    assert data["settings"]["shard"] == [0, 1] and data["settings"]["model_sha256"] == result.slides[0].model_sha256
    assert [set(s) for s in data["slides"]] == [{f.name for f in fields(cohort.SlideStatus)}] * 3
    assert [(s["name"], s["status"]) for s in data["slides"]] == [("s1", "skipped"), ("s2", "done"), ("s3", "failed")]
    assert data["slides"] == [asdict(s) for s in result.slides]
    assert seen[-1] == data["slides"][1:]  # the journal's lines (the slides run), as the record has them


@pytest.mark.parametrize("options, message", [
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--precision", "fp16"], "was exported at fp32; onnxruntime runs it as exported"),
    (["--layout", "sparse"], "unknown layout 'sparse'; expected one of: dense, indexed"),
    (["--table", "memroy"], "unknown table location 'memroy'"),
    (["--table-dtype", "int8"], "unknown table dtype 'int8'"),
    (["--table-dtype", "fp16"], "--table-dtype applies to the indexed layout run from a checkpoint"),
    (["--tf32"], "tf32 is a math mode of NVIDIA GPUs; the ort-cpu backend runs on the CPU"),
    (["--cuda-graph"], "CUDA graphs are replayed by the onnxruntime GPU backends"),
])  # fmt: skip
def test_settings_no_slide_can_run_with_are_refused_up_front(tmp_path, model, options, message):
    """These failed every slide in turn (exit 1, a record of failures), or were passed over (a misspelt --table on
    dense bundles), instead of one line and exit 2 before any slide runs."""
    slides = make_slides(tmp_path / "in", ["a", "b"])
    result = run("infer", model, "-i", *slides, "--output-dir", tmp_path / "out", "--format", "npy", *options)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_an_input_a_file_or_lacks_its_parent_is_refused(tmp_path, model):
    """A bundle folder given as --output-dir received the other slides' .npy outputs and the record, and then no
    longer loaded ("unknown array"); a missing parent folder was created (every other output refuses it)."""
    slides = make_slides(tmp_path / "in", ["a"])
    folder = tmp_path / "folder-bundle"
    save_bundle(folder, synth_bundle("cell", "neighbors", 5, D, G, seed=3, n_neighbors=3))
    before = sorted(p.name for p in folder.iterdir())
    result = run("infer", model, "-i", folder, *slides, "--output-dir", folder, "--format", "npy")
    assert result.exit_code == 2 and "is an input of this run" in result.output, result.output
    assert sorted(p.name for p in folder.iterdir()) == before
    result = run("infer", model, "-i", *slides, folder, "--output-dir", folder / "sub", "--format", "npy")
    assert result.exit_code == 2 and "is an input of this run" in result.output, result.output
    assert sorted(p.name for p in folder.iterdir()) == before
    result = run("infer", model, "-i", *slides, folder, "--output-dir", slides[0], "--format", "npy")
    assert result.exit_code == 2 and "exists and is not a folder; --output-dir takes a folder" in result.output
    missing = tmp_path / "nope" / "out"
    result = run("infer", model, "-i", *slides, folder, "--output-dir", missing, "--format", "npy")
    assert result.exit_code == 2 and "does not exist (deepspot does not create parent folders)" in result.output
    assert not missing.parent.exists()
    # An output folder that holds the bundles is what most users give: it is taken.
    result = run("infer", model, "-i", *slides, folder, "--output-dir", tmp_path / "in", "--format", "npy")
    assert result.exit_code == 0, result.output


def test_a_cohort_s_errors_name_its_arguments_from_python_and_its_flags_from_the_command_line(tmp_path, model):
    from deepspot.errors import ConfigError
    from deepspot.runtime.cohort import run_cohort

    from _cli import error_line

    slides = make_slides(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        run_cohort(model, plan_slides(slides, None, out, "npy"), out, devices=["0", "1"])
    assert str(e.value) == ("devices=['0', '1'] names GPUs, but backend 'ort-cpu' runs on the CPU; add "
                            "backend='ort-cuda' (or torch-cuda), or give devices=['cpu', 'cpu'] for CPU workers")  # fmt: skip
    result = run("infer", model, "-i", *slides, "--output-dir", out, "--devices", "0,1")
    assert error_line(result) == ("Error: --devices 0,1 names GPUs, but backend 'ort-cpu' runs on the CPU; add "
                                  "--backend ort-cuda (or torch-cuda), or give --devices cpu,cpu for CPU workers")  # fmt: skip
    result = run("infer", model, "-i", *slides, "--output-dir", out, "--shard", "3/3")
    assert error_line(result) == "Error: --shard 3/3: I must lie in 0..2, got 3"
    assert not out.exists()


@pytest.mark.parametrize("from_cli", [False, True])
def test_a_slide_s_error_in_a_worker_process_names_what_the_caller_gave(tmp_path, model, from_cli):
    """Spawned workers start with a fresh context: a cohort run from the command line tells them so, and their slides'
    errors name its flags; one run from Python, its arguments."""
    from deepspot.runtime.cohort import CohortSettings, run_cohort

    slides = make_slides(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    if from_cli:
        result = run("infer", model, "-i", *slides, "--output-dir", out, "--format", "npy", "--layout", "indexed",
                     "--devices", "cpu,cpu")  # fmt: skip
        assert result.exit_code == 1, result.output
    else:
        result = run_cohort(model, plan_slides(slides, None, out, "npy"), out, CohortSettings(layout="indexed"),
                            devices=["cpu", "cpu"])  # fmt: skip
        assert len(result.failed) == 2
    errors = [s["error"] for s in record(out).values()]
    advice = "run it with --layout dense" if from_cli else "run it with layout='dense'"
    assert len(errors) == 2 and all(e.endswith(f"this bundle holds neighbour features, so {advice}") for e in errors)
