"""Cohorts: many slides through one model, one output per slide, resumable, sharded, one worker per device.

The slide is the unit of work. :func:`run_cohort` loads the model once per process (a :class:`ModelSession`) and
predicts each slide into ``OUT/<slide>.<format>``, written atomically. ``OUT/cohort.json`` records every slide's
status, items, seconds, output, and what made it (the model's SHA-256, the input's size and modification time or,
with ``verify``, its SHA-256). The record is written atomically at the start (the slides already up to date) and at
the end; in between, each slide's status is appended, as one JSON line, to ``OUT/cohort.journal.jsonl`` as it is
known, and flushed, so a run killed at any point leaves only whole outputs and a record of them that lacks at most the
slide in progress (the cost per slide is one line, not the whole record again). The same command run again reads
both and finishes exactly the slides that are missing; the journal is removed once the final record is written.
A slide that fails, for whatever reason, is recorded with its one-line error and does not stop the others.

``shard="I/N"`` keeps the slides whose name hashes to ``I`` modulo ``N``: N jobs with the same slide list cover each
slide exactly once, whatever order they list them in. Each shard keeps its own record and journal,
``OUT/cohort.shard-I-of-N.json`` and ``OUT/cohort.shard-I-of-N.journal.jsonl``, so shards running at once into one
folder never write each other's; resuming reads every record and journal in the folder. ``devices=[...]`` starts
one worker process per device and hands out slides as workers free up (the workers report to the parent, the one
writer); across a cluster, a workflow engine fans out slides (``workflow/Snakefile``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import queue
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import interrupts
from ..errors import (
    ConfigError,
    DeepSpotError,
    InputError,
    advice,
    command_line,
    from_command_line,
    option,
    option_value,
)
from ..fileio import atomic_path, check_output_folder, file_sha256, refuse_inputs, remove_leftovers

FORMATS = ("h5ad", "npz", "npy")
RECORD = "cohort.json"
#: The settings that change what a slide's predictions are, beyond the rounding that differs between backends and
#: batch sizes: an output made with other values of these is out of date. (The backend, layout and batch size give
#: the same predictions within the parity tolerances, and redoing a cohort for them would be wasted.)
VALUE_SETTINGS = ("inverse_transform", "precision", "table_dtype", "tf32")
JOURNAL = "cohort.journal.jsonl"
SHARD_RECORDS = "cohort.shard-*-of-*.json"
SHARD_JOURNALS = "cohort.shard-*-of-*.journal.jsonl"


def record_name(shard: tuple[int, int] | None) -> str:
    """``cohort.json``, or ``cohort.shard-I-of-N.json`` for shard ``(I, N)``: one writer per file."""
    return RECORD if shard is None else f"cohort.shard-{shard[0]}-of-{shard[1]}.json"


def journal_name(shard: tuple[int, int] | None) -> str:
    """``cohort.journal.jsonl``, or ``cohort.shard-I-of-N.journal.jsonl``: the lines its record does not hold yet."""
    return record_name(shard).removesuffix(".json") + ".journal.jsonl"


@dataclass
class Slide:
    """One slide of a cohort: its name, feature bundle and output file."""

    name: str
    input: Path
    output: Path


@dataclass
class SlideStatus:
    """What happened to a slide: ``done``, ``skipped`` (an up-to-date output exists) or ``failed`` (and why)."""

    name: str
    status: str
    input: str
    output: str
    items: int = 0
    seconds: float = 0.0
    error: str | None = None
    model_sha256: str | None = None
    input_fingerprint: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the options that shape its values (VALUE_SETTINGS)
    output_bytes: int | None = None  # the output's size when written: a file cut short since (a crash) is redone


@dataclass
class CohortResult:
    slides: list[SlideStatus]
    record: Path

    @property
    def failed(self) -> list[SlideStatus]:
        return [s for s in self.slides if s.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "skipped": 0, "failed": 0}
        for s in self.slides:
            out[s.status] += 1
        return out


# -- which slides ----------------------------------------------------------------------------------------------------
def slide_name(path: str | Path) -> str:
    """A slide's name from its bundle: the file name without ``.npz`` (a bundle folder's name as it is)."""
    path = Path(path)
    return path.stem if path.suffix.lower() == ".npz" else path.name


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a manifest CSV: ``slide`` and ``input`` columns, optional ``output``; relative paths are taken from
    the manifest's folder.

    Raises:
        InputError: A missing file or column, an empty or duplicate slide name.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such manifest")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable CSV manifest ({e})") from None
    if not rows or not {"slide", "input"} <= set(rows[0]):
        raise InputError(f"{path}: a manifest needs 'slide' and 'input' columns")
    for i, row in enumerate(rows, start=2):
        if not (row.get("slide") or "").strip() or not (row.get("input") or "").strip():
            raise InputError(f"{path}: line {i} has an empty slide or input")
        for key in ("input", "output"):
            if row.get(key) and not Path(row[key]).is_absolute():
                row[key] = str(path.parent / row[key])
    return rows


def plan_slides(
    inputs: Sequence[str | Path] = (),
    manifest: str | Path | None = None,
    output_dir: str | Path = ".",
    fmt: str = "h5ad",
) -> list[Slide]:
    """The cohort's slides, from bundle paths (named after their files) or a manifest, in the given order.

    Raises:
        ConfigError: Neither or both of ``inputs`` and ``manifest``, or an unknown format.
        InputError: Two slides with one name, a name that is a path, or a bad manifest.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if bool(inputs) == (manifest is not None):
        bundles = advice("inputs=['A.npz', 'B.npz', ...]", "--input A.npz B.npz ...")
        raise ConfigError(f"give the slides either as {bundles} or as {option_value('manifest', 'slides.csv')}")
    rows = read_manifest(manifest) if manifest is not None else [{"slide": slide_name(p), "input": str(p)} for p in inputs]
    output_dir = Path(output_dir)
    slides, seen = [], set()
    for row in rows:
        name = row["slide"].strip()
        if name in seen:
            raise InputError(f"slide {name!r} appears twice; slide names must be unique (they name the outputs)")
        if name in (".", "..") or "/" in name or "\\" in name:
            raise InputError(f"slide name {name!r} is a path; it names a file in the output folder")
        seen.add(name)
        out = Path(row["output"]) if row.get("output") else output_dir / f"{name}.{fmt}"
        slides.append(Slide(name, Path(row["input"]), out))
    return slides


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"{option('shard')} takes I/N with integers, such as 0/4; got {text!r}") from None
    if n < 1:
        raise ConfigError(f"{option_value('shard', text)}: N (the number of shards) must be at least 1, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"{option_value('shard', text)}: I must lie in 0..{n - 1}, got {i}")
    return i, n


def in_shard(name: str, shard: tuple[int, int] | None) -> bool:
    """Whether slide ``name`` belongs to shard ``(I, N)``: a hash of the name, so order and listing do not matter."""
    if shard is None:
        return True
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return digest % shard[1] == shard[0]


# -- resume ----------------------------------------------------------------------------------------------------------
def input_fingerprint(path: Path, verify: bool) -> dict[str, Any]:
    """Size and modification time of a bundle (every ``.npy`` of a folder), or its SHA-256 with ``verify``."""
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    if verify:
        h = hashlib.sha256()
        for f in files:
            h.update(file_sha256(f).encode())
        return {"sha256": h.hexdigest()}
    stats = [f.stat() for f in files]
    return {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _written(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _record_slides(path: Path) -> list[Any]:
    """The slides of a record; none if it cannot be read. A slide without its own ``settings`` (a record written
    before slides had them) takes the record's."""
    try:
        data = json.loads(path.read_text())
        slides, settings = data.get("slides", []), data.get("settings")
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deeply
        return []
    if not isinstance(slides, list):
        return []
    if isinstance(settings, dict):
        common = {k: settings.get(k) for k in VALUE_SETTINGS}
        slides = [{"settings": common, **s} if isinstance(s, dict) and "settings" not in s else s for s in slides]
    return slides


def _journal_slides(path: Path) -> list[Any]:
    """The slides of a journal, one per line, in the order they were written; none if it cannot be read."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return []
    slides = []
    for line in lines:
        try:
            slides.append(json.loads(line))
        except (ValueError, RecursionError):
            continue  # cut short by a kill while it was written (the last line): that slide is not recorded
    return slides


def read_record(output_dir: Path) -> dict[str, dict[str, Any]]:
    """What earlier runs recorded, by slide name: ``cohort.json``, every shard's record and their journals, the most
    recently written last (so it wins). A journal is newer than its own record (it holds what came after), whatever
    their times say; an unreadable file counts as none, and a journal's line that does not parse (or is nested too
    deeply) as no line."""
    found = []  # (when written, 0 for a record and 1 for a journal, its slides)
    for path in [output_dir / RECORD, *output_dir.glob(SHARD_RECORDS)]:
        if (written := _written(path)) is not None:
            found.append((written, 0, _record_slides(path)))
    for path in [output_dir / JOURNAL, *output_dir.glob(SHARD_JOURNALS)]:
        if (written := _written(path)) is not None:
            own_record = path.with_name(path.name.removesuffix(".journal.jsonl") + ".json")
            found.append((max(written, _written(own_record) or 0), 1, _journal_slides(path)))
    slides: dict[str, dict[str, Any]] = {}
    for _, _, data in sorted(found, key=lambda item: item[:2]):
        slides.update({s["name"]: s for s in data if isinstance(s, dict) and isinstance(s.get("name"), str)})
    return slides


def is_up_to_date(slide: Slide, previous: dict[str, Any] | None, model_hash: str | None, verify: bool,
                  settings: dict[str, Any] | None = None) -> bool:  # fmt: skip
    """An output that exists, as large as when it was written, and that the same model made from the same input with
    the same ``settings`` (those of :data:`VALUE_SETTINGS`: a slide predicted on the standardised scale is not up to
    date for ``inverse_transform``)."""
    if previous is None or previous.get("status") not in ("done", "skipped") or not slide.output.is_file():
        return False
    if previous.get("output_bytes") is not None and slide.output.stat().st_size != previous["output_bytes"]:
        return False
    if model_hash is None or previous.get("model_sha256") != model_hash:
        return False
    if settings is not None and previous.get("settings") != settings:
        return False
    recorded = previous.get("input_fingerprint") or {}
    return recorded == input_fingerprint(slide.input, verify) if slide.input.exists() else False


def write_record(output_dir: Path, statuses: dict[str, SlideStatus], settings: dict[str, Any],
                 shard: tuple[int, int] | None = None) -> Path:  # fmt: skip
    path = output_dir / record_name(shard)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "slides": [asdict(s) for s in statuses.values()]}, indent=1))
    return path


class Journal:
    """A record's newer lines: one JSON line per slide (a record's ``slides`` entry), appended and flushed as each is
    known, so a killed run loses at most the slide in progress. Opening it empties what an earlier run left: its
    lines were read, and the slides they made up to date are in the record written just before (the others run
    again). One writer: the process that runs the cohort (the workers of ``devices`` report to it, never write here)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # O_APPEND: each line goes to the end in one write, whatever else has the file open.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        except OSError as e:
            raise DeepSpotError(f"{path}: cannot write here ({e.strerror})") from None
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def append(self, status: SlideStatus) -> None:
        try:
            self._file.write(json.dumps(asdict(status)) + "\n")
            self._file.flush()
        except OSError as e:
            raise DeepSpotError(f"{self.path}: cannot write here ({e.strerror or e})") from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # a line that could not be flushed now was not recorded; the next run redoes that slide

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- running ---------------------------------------------------------------------------------------------------------
@dataclass
class CohortSettings:
    """How every slide is run (the :func:`~deepspot.runtime.infer` options shared by the cohort)."""

    def values(self) -> dict[str, Any]:
        """The settings that shape the predicted values (:data:`VALUE_SETTINGS`), recorded with each slide."""
        return {k: getattr(self, k) for k in VALUE_SETTINGS}

    backend: str | None = None
    batch_size: int | None = None
    inverse_transform: bool = False
    layout: str | None = None
    table: str = "auto"
    table_dtype: str = "fp32"
    max_bag: int = 1024
    precision: str | None = None
    threads: int | None = None
    tf32: bool = False
    cuda_graph: bool | None = None


def _run_slides(model: Any, slides: Iterable[Slide], settings: CohortSettings, device: str | None, report) -> None:
    """Run slides in this process with one model session; ``report(status)`` after each."""
    from .backends import RunnerOptions
    from .infer import ModelSession, infer

    options = RunnerOptions(precision=settings.precision, threads=settings.threads, tf32=settings.tf32,
                            cuda_graph=settings.cuda_graph)  # fmt: skip
    if device not in (None, "cpu"):
        options.device = int(device)
    with ModelSession(model, settings.backend, options, table_dtype=settings.table_dtype, shared=True) as session:
        for slide in slides:
            status = SlideStatus(slide.name, "done", str(slide.input), str(slide.output), device=device,
                                 settings=settings.values())  # fmt: skip
            start = time.perf_counter()
            try:
                status.input_fingerprint = input_fingerprint(slide.input, False) if slide.input.exists() else {}
                result = infer(
                    model, slide.input, slide.output, backend=settings.backend, batch_size=settings.batch_size,
                    inverse_transform=settings.inverse_transform, layout=settings.layout, table=settings.table,
                    table_dtype=settings.table_dtype, max_bag=settings.max_bag, session=session,
                )  # fmt: skip
                status.items = result.n
                status.model_sha256 = session.model_hash
                status.output_bytes = slide.output.stat().st_size
            except Exception as e:  # noqa: BLE001  this slide fails, with its one-line error; the others still run
                stop = interrupts.received()
                if stop is not None:  # Ctrl-C or SIGTERM, swallowed by a C extension that raised its own error
                    raise stop() from e
                status.status, status.error = "failed", _slide_error(e)
            status.seconds = time.perf_counter() - start
            report(status)


def _slide_error(e: Exception) -> str:
    """A failed slide's one line: a user's mistake or the file system's refusal as it says, a backend's own error
    (onnxruntime's, CUDA out of memory) by its type and first line."""
    if isinstance(e, DeepSpotError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class _Stopped(BaseException):
    """Raised in a worker on SIGTERM (the parent stopping it), so that its temporary files are removed."""


def _stop(signum, frame) -> None:
    interrupts.note(_Stopped)
    raise _Stopped()


def _worker(model: Any, slides: list[Slide], settings: CohortSettings, device: str, taken, done,
            from_cli: bool) -> None:  # fmt: skip
    """A device's worker process: takes the next slide index from the shared counter ``taken`` until none is left,
    reports to ``done``. SIGTERM (the parent stopping the cohort) unwinds the slide in progress, so its temporary
    files go with it. ``from_cli``: the cohort came from the command line, so errors name its flags (a spawned
    process does not inherit the parent's context)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    signal.signal(signal.SIGTERM, _stop)

    def take():
        while True:
            with taken.get_lock():
                i = taken.value
                taken.value += 1
            if i >= len(slides):
                return
            yield slides[i]

    try:
        with command_line(from_cli):
            _run_slides(model, take(), settings, device, done.put)
    except _Stopped:
        return
    except BaseException as e:  # noqa: BLE001  a worker that cannot start (no such GPU) reports it and ends
        done.put(("worker-failed", device, f"{type(e).__name__}: {e}"))


def check_setup(model: Any, backend: str | None, devices: Sequence[str] | None,
                inverse_transform: bool = False, settings: CohortSettings | None = None) -> None:  # fmt: skip
    """Refuse, before any slide runs, what would fail every slide the same way: a ``--devices`` entry that is neither
    a GPU index nor ``cpu``, GPU indices for a backend that runs on the CPU (or the reverse), a backend that
    cannot run here, ``inverse_transform`` for an exported model without a scaler (a checkpoint's is known once
    it is loaded, by the first slide), and ``settings`` that no slide can run with (an unknown layout, table,
    table dtype or precision, ``--tf32`` or CUDA graphs on a CPU backend, a precision other than an exported graph's
    on onnxruntime's backends); ``settings`` that would be passed over (``--table-dtype`` for an export) too.

    Raises:
        ConfigError: A device list that does not fit the backend, or such settings.
        BackendUnavailableError: The backend cannot run on this machine.
    """
    from .artifacts import artifact_kind
    from .backends import DEFAULT_BACKEND, RunnerOptions, check_gpu_options, get_backend, select_backend
    from .indexed import is_indexed_folder
    from .infer import check_backend_options, check_layout_options

    kind = "onnx" if is_indexed_folder(model) else artifact_kind(model)
    name = backend or DEFAULT_BACKEND[kind]
    if settings is not None:
        check_layout_options(settings.layout, settings.table, settings.table_dtype)
        check_backend_options(model, name, table_dtype=settings.table_dtype)
        options = RunnerOptions(precision=settings.precision, threads=settings.threads, tf32=settings.tf32,
                                cuda_graph=settings.cuda_graph)  # fmt: skip
        check_gpu_options(options, name)
        if settings.precision is not None and kind == "onnx" and name in ("ort-cpu", "ort-cuda"):
            _check_graph_precision(model, settings.precision, name)
    on_gpu = get_backend(name).device == "cuda"
    for d in devices or ():
        if d != "cpu" and not d.isdigit():
            raise ConfigError(f"{option('devices')}: {d!r} is neither a GPU index (0, 1, ...) nor cpu")
    gpus = [d for d in devices or () if d != "cpu"]
    if gpus and not on_gpu:
        raise ConfigError(f"{_devices(devices)} names GPUs, but backend {name!r} runs on the CPU; add "
                          f"{option_value('backend', 'ort-cuda')} (or torch-cuda), or give {_devices(['cpu', 'cpu'])} "
                          "for CPU workers")  # fmt: skip
    if on_gpu and devices and len(gpus) < len(devices):
        raise ConfigError(f"{_devices(devices)}: backend {name!r} runs on a GPU, so give GPU indices only")
    select_backend(name, kind=kind, fallback_hint=False)  # says why the backend cannot run here, once, instead of once per slide
    if inverse_transform and kind == "onnx":
        from ..export import read_model_metadata
        from ..export.metadata import HEAD_FILE
        from .artifacts import info_from_onnx_metadata

        graph = Path(model) / HEAD_FILE if is_indexed_folder(model) else Path(model)
        info = info_from_onnx_metadata(read_model_metadata(graph), str(graph))
        if info is not None:
            info.check_inverse_transform(model)


def _devices(devices: Sequence[str]) -> str:
    """A device list as the caller gave it: ``devices=['0', '1']``, or ``--devices 0,1`` on the command line."""
    return advice(f"devices={list(devices)!r}", f"--devices {','.join(devices)}")


def check_output_dir(output_dir: str | Path, model: Any, slides: Sequence[Slide]) -> Path:
    """Refuse, before any work, an ``--output-dir`` that is a file, whose parent folder is missing (deepspot makes the
    folder itself, never its parents: a typo fails at once), or that is one of the run's inputs or lies inside one (a
    bundle folder of ``.npy`` files, an indexed export): the outputs and the record written there would become part
    of the input, and a bundle folder would no longer load."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir}: exists and is not a folder; {option('output_dir')} takes a folder")
    if not output_dir.is_dir():
        check_output_folder(output_dir, option("output_dir"))
    refuse_inputs(output_dir, [model, *(slide.input for slide in slides)], "cohort's outputs")
    # A manifest's own output paths: their folders must exist too (a typo in one row would fail that slide only,
    # after the others had run).
    for slide in slides:
        folder = slide.output.parent
        if folder != output_dir and not folder.is_dir():
            raise InputError(f"{slide.output}: the output folder of slide {slide.name!r} does not exist (deepspot "
                             f"makes {option('output_dir')}, not the folders a manifest names)")  # fmt: skip
    return output_dir


def _check_graph_precision(model: Any, precision: str, backend: str) -> None:
    """onnxruntime runs a graph at the precision it was exported at: another is refused once, not once per slide."""
    from ..export import read_model_metadata
    from ..export.metadata import HEAD_FILE
    from .artifacts import info_from_onnx_metadata
    from .backends import onnx_precision
    from .indexed import is_indexed_folder

    graph = Path(model) / HEAD_FILE if is_indexed_folder(model) else Path(model)
    if not graph.is_file():
        return  # the first slide says what is missing
    onnx_precision(model, info_from_onnx_metadata(read_model_metadata(graph), str(graph)), precision, backend)


def run_cohort(
    model: Any,
    slides: list[Slide],
    output_dir: str | Path,
    settings: CohortSettings | None = None,
    shard: tuple[int, int] | None = None,
    force: bool = False,
    verify: bool = False,
    devices: Sequence[str] | None = None,
    on_status=None,
) -> CohortResult:
    """Predict each slide of a cohort; see the module doc.

    Args:
        model: What :func:`~deepspot.runtime.infer` takes (a path: its hash decides what is up to date).
        slides: From :func:`plan_slides`.
        output_dir: Where ``cohort.json``, its journal (while it runs) and by default the outputs go; created if
            missing (its parent folder must exist).
        settings: Options shared by every slide.
        shard: ``(I, N)``: only the slides of shard I of N.
        force: Redo slides whose output is up to date.
        verify: Compare inputs by SHA-256 instead of size and modification time.
        devices: One worker process per entry (GPU indices, or ``cpu``); ``None``: this process alone.
        on_status: Called with each :class:`SlideStatus` as it is known (progress lines).
    """
    from .infer import model_fingerprint

    settings = settings or CohortSettings()
    check_setup(model, settings.backend, devices, settings.inverse_transform, settings)
    output_dir = check_output_dir(output_dir, model, slides)
    output_dir.mkdir(exist_ok=True)
    remove_leftovers(output_dir)  # each slide's own output folder is swept by infer() before it writes there
    previous = read_record(output_dir)
    model_hash = model_fingerprint(model) if isinstance(model, (str, os.PathLike)) else None
    statuses: dict[str, SlideStatus] = {}
    todo: list[Slide] = []
    for slide in slides:
        if not in_shard(slide.name, shard):
            continue
        old = previous.get(slide.name)
        if not force and is_up_to_date(slide, old, model_hash, verify, settings.values()):
            statuses[slide.name] = SlideStatus(slide.name, "skipped", str(slide.input), str(slide.output),
                                               old.get("items", 0), 0.0, None, model_hash,
                                               input_fingerprint(slide.input, verify),
                                               settings=settings.values(), output_bytes=old.get("output_bytes"))  # fmt: skip
        else:
            todo.append(slide)
    record_settings = {"model": str(model), "model_sha256": model_hash, "shard": shard, "verify": verify,
                       **asdict(settings)}  # fmt: skip

    for status in list(statuses.values()):
        if on_status is not None:
            on_status(status)
    write_record(output_dir, statuses, record_settings, shard)  # the slides up to date; the journal adds the others
    journal_path = output_dir / journal_name(shard)
    with Journal(journal_path) as journal:

        def report(status: SlideStatus) -> None:  # in this process only, with or without workers
            if verify and status.status == "done":
                status.input_fingerprint = input_fingerprint(Path(status.input), True)
            statuses[status.name] = status
            journal.append(status)  # one line, not the whole record again: a cohort costs O(N), not O(N^2)
            if on_status is not None:
                on_status(status)

        if not devices:
            _run_slides(model, todo, settings, None, report)
        else:
            _run_workers(model, todo, settings, list(devices), report)
    order = {s.name: i for i, s in enumerate(slides)}
    ordered = dict(sorted(statuses.items(), key=lambda kv: order[kv[0]]))
    record = write_record(output_dir, ordered, record_settings, shard)
    journal_path.unlink(missing_ok=True)  # the record now holds every line of it
    return CohortResult(list(ordered.values()), record)


def _run_workers(model, todo: list[Slide], settings: CohortSettings, devices: list[str], report) -> None:
    if not todo:
        return
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    # Slides are handed out by a shared counter, not a queue of indices: a queue's feeder thread would block the
    # parent's exit on a full pipe when no worker is left to read it (thousands of slides, every worker failed).
    taken, results = ctx.Value("q", 0), ctx.Queue()
    from_cli = from_command_line()
    workers = [ctx.Process(target=_worker, args=(model, todo, settings, d, taken, results, from_cli), daemon=True)
               for d in devices[: len(todo)]]  # fmt: skip  (no more workers than slides)
    for w in workers:
        w.start()
    pending = {s.name for s in todo}
    failures = []
    finished = False
    try:
        while pending:
            try:
                item = results.get(timeout=0.5)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    break
                continue
            if isinstance(item, tuple) and item[0] == "worker-failed":
                failures.append(f"worker on device {item[1]}: {item[2]}")
                continue
            pending.discard(item.name)
            report(item)
        finished = True
    finally:
        if finished:  # every slide reported: the workers are ending by themselves
            for w in workers:
                w.join(timeout=10)
        for w in workers:
            if w.is_alive():
                w.terminate()  # SIGTERM: the worker removes the temporary files of the slide it was on
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
    by_name = {s.name: s for s in todo}
    for name in sorted(pending):  # slides no worker could take (every worker failed)
        slide = by_name[name]
        why = "; ".join(failures) or "its worker process ended unexpectedly"
        report(SlideStatus(name, "failed", str(slide.input), str(slide.output), error=why))


__all__ = [
    "CohortResult",
    "CohortSettings",
    "Slide",
    "SlideStatus",
    "in_shard",
    "parse_shard",
    "plan_slides",
    "read_manifest",
    "run_cohort",
]
