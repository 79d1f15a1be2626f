"""AnnData in and out: coordinates from a sample's ``.h5ad`` (or a CSV), predictions to an ``.h5ad``.

anndata is an optional extra (``pip install 'deepspot[anndata]'``); it is imported only when an ``.h5ad`` is read or
written, so the rest of the package works without it. CSV coordinates need nothing beyond NumPy.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, DeepSpotWarning, InputError
from .fileio import atomic_path, check_hdf5

COORD_COLUMNS = ("x_array", "y_array", "x_pixel", "y_pixel")
#: Other names of the same coordinates: scanpy / squidpy's Visium ``obs`` and Space Ranger's ``tissue_positions.csv``.
#: The reference's ``x`` is the row (its ``crop_tile`` takes ``y_pixel`` as the left edge), scanpy's ``x`` the column.
COORD_ALIASES = {
    "array_row": "x_array",
    "array_col": "y_array",
    "pxl_row_in_fullres": "x_pixel",
    "pxl_col_in_fullres": "y_pixel",
}
#: Space Ranger 1.x's ``tissue_positions_list.csv``: these columns, without a header line.
SPACERANGER_V1_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
#: ``obs`` columns read besides the coordinates: which spots lie on the tissue, and the reference's sample grouping.
EXTRA_COLUMNS = ("in_tissue", "sampleID")
#: Names of a CSV's barcode column: ours, Xenium's ``cells.csv`` (``cell_id``), and the index column pandas writes
#: (``DataFrame.to_csv``: an empty name; ``Unnamed: 0`` is what pandas calls that column when it reads it back).
#: Never "the first column" by position. A named one comes before the unnamed index (a ``RangeIndex`` written beside a
#: ``barcode`` column); two named ones, or two unnamed ones, that disagree are an error, not a choice.
BARCODE_COLUMNS = ("barcode", "barcodes", "cell_id", "", "Unnamed: 0")


def _anndata():
    try:
        import anndata
    except ImportError:
        raise BackendUnavailableError(
            "reading or writing .h5ad needs anndata, which is not installed: pip install 'deepspot[anndata]'"
        ) from None
    return anndata


# -- reading coordinates ------------------------------------------------------------------------------------------
def read_obs(path: str | Path, extra: Sequence[str] = ()) -> tuple[list[str], dict[str, np.ndarray]]:
    """Barcodes and coordinates of a sample.

    From an ``.h5ad``: ``obs_names``, the ``obs`` coordinate columns that exist (``x_array``, ``y_array``, ``x_pixel``,
    ``y_pixel``, or scanpy's ``array_row``, ``array_col``), and ``obsm["spatial"]`` (scanpy's ``[column, row]`` pixel
    order) where ``obs`` has no pixel columns; only ``obs`` and ``obsm`` are read, not ``X``. From a ``.csv``: the
    barcode column (one of :data:`BARCODE_COLUMNS`: ``barcode``, ``barcodes``, ``cell_id`` or pandas' unnamed index
    column) and the same columns, Space Ranger's ``tissue_positions.csv`` included (``pxl_row_in_fullres``,
    ``pxl_col_in_fullres``), and Space Ranger 1.x's ``tissue_positions_list.csv``, which has no header line (six
    columns, the last five numbers). ``in_tissue`` and the ``extra`` columns (such as ``sampleID``) come along when
    present.

    Barcodes (and the ``extra`` columns' values) are identifiers, taken verbatim from either source, as
    ``pandas.read_csv`` and ``anndata.read_csv`` take them: a space inside or around one is kept (a CSV written as
    ``a, b`` gives ``" b"``). Only the header's names are matched without their surrounding spaces, and numbers are
    read as ``float`` reads them.

    Returns:
        ``(barcodes, columns)``: barcodes in file order; float64 coordinates by the reference's names, and the other
        columns as they are.

    Raises:
        InputError: The file is missing, unreadable, has no barcodes, an empty one, two barcode columns that disagree,
            or a non-numeric coordinate.
        BackendUnavailableError: An ``.h5ad`` without anndata installed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such coordinates file (expected .h5ad or .csv)")
    suffix = path.suffix.lower()
    wanted = tuple(COORD_COLUMNS) + tuple(COORD_ALIASES) + EXTRA_COLUMNS + tuple(extra)
    if suffix == ".h5ad":
        barcodes, columns = _read_h5ad_obs(path, wanted)
    elif suffix in (".csv", ".tsv", ".txt"):
        barcodes, columns = _read_csv_obs(path, "\t" if suffix == ".tsv" else ",", wanted)
    else:
        raise InputError(f"{path}: unknown coordinates format {path.suffix!r}; expected .h5ad or .csv")
    if not barcodes:
        raise InputError(f"{path}: holds no barcodes")
    out: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        target = COORD_ALIASES.get(name, name)
        if target in COORD_COLUMNS + ("in_tissue",):
            try:
                values = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"{path}: column {name!r} is not numeric") from None
        if target not in out or name == target:
            out[target] = np.asarray(values)
    return barcodes, out


def _read_h5ad_obs(path: Path, wanted: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    ad = _anndata()
    import h5py

    try:
        read_elem = ad.io.read_elem if hasattr(ad, "io") and hasattr(ad.io, "read_elem") else ad.experimental.read_elem
        with h5py.File(path, "r") as f:
            check_hdf5(f, path, ("obs", "obsm/spatial"))
            obs = read_elem(f["obs"])
            spatial = np.asarray(f["obsm"]["spatial"]) if "obsm" in f and "spatial" in f["obsm"] else None
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a readable .h5ad file ({str(e).splitlines()[0]})") from None
    columns = {name: np.asarray(obs[name]) for name in wanted if name in obs.columns}
    if spatial is not None and "x_pixel" not in columns and "pxl_row_in_fullres" not in columns:
        if spatial.ndim != 2 or spatial.shape[1] < 2 or spatial.shape[0] != len(obs.index):
            raise InputError(f"{path}: obsm['spatial'] has shape {spatial.shape}, expected (n_obs, 2)")
        columns["x_pixel"], columns["y_pixel"] = spatial[:, 1], spatial[:, 0]  # scanpy's [x, y] = [column, row]
    return [str(b) for b in obs.index], columns


def _read_csv_obs(path: Path, delimiter: str, wanted: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's CSV starts with a byte-order mark
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            rows = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from None
    if header is None:
        raise InputError(f"{path}: empty CSV file")
    names = [h.strip() for h in header]  # names we look up; the values below are taken as they are
    if (not any(c in names for c in BARCODE_COLUMNS) and len(header) == len(SPACERANGER_V1_COLUMNS)
            and all(_is_number(v) for v in header[1:])):  # fmt: skip
        names, rows = list(SPACERANGER_V1_COLUMNS), [header, *rows]  # its first line is a spot, not a header
    bad = next((i for i, r in enumerate(rows) if len(r) != len(names)), None)
    if bad is not None:
        raise InputError(f"{path}: line {bad + 2} has {len(rows[bad])} fields, the header {len(names)}")
    barcodes = _csv_barcodes(path, names, rows)
    columns = {}
    for name in wanted:
        if name in names:
            j = names.index(name)
            values = [r[j] for r in rows]
            if COORD_ALIASES.get(name, name) in COORD_COLUMNS + ("in_tissue",):
                try:
                    values = [float(v) for v in values]
                except ValueError:
                    line, value = next((i + 2, v) for i, v in enumerate(values) if not _is_number(v))
                    what = "is empty" if not value.strip() else f"holds {value[:40]!r}, which is not a number"
                    raise InputError(f"{path}: line {line}: column {name!r} {what}") from None
            columns[name] = np.asarray(values)
    return barcodes, columns


def _csv_barcodes(path: Path, names: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The barcodes of a CSV's rows, verbatim, from its barcode column (see :data:`BARCODE_COLUMNS`).

    Raises:
        InputError: No barcode column, an empty barcode, or two barcode columns that disagree (naming the line).
    """
    # A named column comes before pandas' unnamed index: a frame written with its default RangeIndex (",barcode,...")
    # or a header with a trailing comma has an unnamed column that holds no barcodes.
    named = [c for c in BARCODE_COLUMNS if c and c != "Unnamed: 0" and c in names]
    found = named or [c for c in ("", "Unnamed: 0") if c in names]
    if not found:
        raise InputError(f"{path}: no barcode column (columns: {', '.join(names)}); name it one of "
                         f"{', '.join(repr(c) for c in BARCODE_COLUMNS if c)}, or write pandas' index")  # fmt: skip
    label = {c: repr(c) if c else "the unnamed index column" for c in found}
    first = names.index(found[0])
    barcodes = [r[first] for r in rows]
    for other in found[1:]:
        j = names.index(other)
        line = next((i + 2 for i, r in enumerate(rows) if r[j] != r[first]), None)
        if line is not None:
            raise InputError(f"{path}: columns {label[found[0]]} and {label[other]} both name the barcodes but disagree "
                             f"at line {line} ({rows[line - 2][first][:40]!r} and {rows[line - 2][j][:40]!r}); keep "
                             "one")  # fmt: skip
    empty = next((i + 2 for i, b in enumerate(barcodes) if not b), None)
    if empty is not None:
        raise InputError(f"{path}: line {empty}: the barcode ({label[found[0]]}) is empty")
    return barcodes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- writing predictions ------------------------------------------------------------------------------------------
def write_anndata(
    path: str | Path,
    predictions: np.ndarray,
    barcodes: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    obs_coords: Mapping[str, np.ndarray] | None = None,
    uns: Mapping[str, Any] | None = None,
    no_clobber: bool = False,
) -> Path:
    """Write predictions as an ``.h5ad`` that scanpy and squidpy read as it is, atomically.

    Args:
        path: Output file.
        predictions: ``(N, G)``; stored as float32 ``X``.
        barcodes: ``obs_names``; default ``"0"`` ... ``"N-1"``.
        genes: ``var_names``; default ``gene_0`` ... .
        obs_coords: Coordinate columns for ``obs`` (``x_array``, ``y_array``, ``x_pixel``, ``y_pixel``). With both
            pixel coordinates, ``obsm["spatial"]`` is ``[y_pixel, x_pixel]``, the reference notebooks' convention
            (their ``x_pixel`` is the image row).
        uns: Metadata (the model's, for instance). ``None`` values are dropped and values h5ad cannot hold are stored
            as JSON text, since an ``.h5ad`` stores neither ``None`` nor mixed lists.
        no_clobber: Refuse to replace an existing file.

    Raises:
        InputError: Names or coordinates whose length disagrees with the predictions.
        BackendUnavailableError: anndata is not installed.
    """
    ad = _anndata()
    import pandas as pd

    path = Path(path)
    x = np.asarray(predictions, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"{path}: predictions must have shape (N, G), got {x.shape}")
    n, g = x.shape
    obs_names = [str(i) for i in range(n)] if barcodes is None else [str(b) for b in barcodes]
    var_names = [f"gene_{j}" for j in range(g)] if genes is None else [str(v) for v in genes]
    if len(obs_names) != n:
        raise InputError(f"{path}: {len(obs_names)} barcodes for {n} predictions")
    if len(var_names) != g:
        raise InputError(f"{path}: {len(var_names)} gene names for {g} predicted genes")
    obs = pd.DataFrame(index=pd.Index(obs_names, name=None))
    for name, values in (obs_coords or {}).items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise InputError(f"{path}: coordinate {name!r} has shape {values.shape}, expected ({n},)")
        obs[name] = values
    var = pd.DataFrame(index=pd.Index(var_names, name=None))
    for what, names, fix in (("barcodes", obs_names, "obs_names_make_unique"),
                             ("gene names", var_names, "var_names_make_unique")):  # fmt: skip
        repeated = len(names) - len(set(names))
        if repeated:
            warnings.warn(f"{path}: {repeated} {what} repeat an earlier one, so they are not unique in the .h5ad "
                          f"(adata.{fix}() makes them unique)", DeepSpotWarning, stacklevel=2)  # fmt: skip
    # Everything but X through anndata; X is then written into the file a block of rows at a time, so a slide's
    # memory-mapped predictions never need to be resident at once (anndata would write them in one piece).
    with warnings.catch_warnings():  # anndata's own "not unique" warning: said above, in one line
        warnings.filterwarnings("ignore", message=".*(Observation|Variable) names are not unique.*")
        adata = ad.AnnData(obs=obs, var=var, uns=_h5ad_safe(dict(uns or {})))
    if "x_pixel" in obs.columns and "y_pixel" in obs.columns:
        adata.obsm["spatial"] = np.column_stack([obs["y_pixel"].to_numpy(), obs["x_pixel"].to_numpy()])
    with atomic_path(path, no_clobber=no_clobber) as tmp:
        adata.write_h5ad(tmp)
        _write_x(tmp, x)
    return path


def _write_x(path: Path, x: np.ndarray, block_bytes: int = 64 << 20) -> None:
    """Add ``x`` to an ``.h5ad`` as its dense ``X`` (anndata's ``array`` encoding), ``block_bytes`` of rows at a time,
    each block's pages of a memory-mapped ``x`` given back once written."""
    import h5py

    from ._pages import release_rows

    with h5py.File(path, "r+") as f:
        dataset = f.create_dataset("X", shape=x.shape, dtype=np.float32)
        dataset.attrs["encoding-type"] = "array"
        dataset.attrs["encoding-version"] = "0.2.0"
        step = max(1, block_bytes // max(1, x.shape[1] * 4))
        for start in range(0, x.shape[0], step):
            dataset[start : start + step] = x[start : start + step]
            release_rows(x, start, start + step)


def _h5ad_safe(value: Any) -> Any:
    """A copy of ``value`` that h5ad can store: dicts kept, ``None`` dropped, odd lists as JSON text."""
    if isinstance(value, Mapping):
        return {str(k): _h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (bool, np.bool_, int, np.integer, str, np.ndarray)):
        return value
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return np.asarray(value, dtype=object)
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value):
            return np.asarray(value, dtype=np.float64 if any(isinstance(v, float) for v in value) else np.int64)
        if value and all(isinstance(v, (bool, np.bool_)) for v in value):
            return np.asarray(value, dtype=bool)
        return json.dumps(value, default=_json_default)
    return json.dumps(value, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


def model_uns(model, **extra: Any) -> dict[str, Any]:
    """``uns`` for a model's predictions: ``{"deepspot": <the checkpoint metadata>, **extra}``."""
    from .checkpoint import model_metadata

    return {"deepspot": model_metadata(model), **extra}
