"""The reference's feature layout, turned into a feature bundle.

The reference stores one ``.npy`` per spot or cell, named ``<barcode>.npy``. For a spot, row 0 holds the features of
the spot's own tile and rows 1 onward those of its sub-tiles, ``(1 + S, D)``; for a cell, one vector ``(D,)`` (or one
row, ``(1, D)``). Coordinates come from the sample's AnnData (or a CSV, see :func:`deepspot.anndata_io.read_obs`).

Neighbours are chosen as the reference's data loaders choose them, within one sample:

- **spots**: every other spot whose array coordinates lie within ``radius`` on both axes
  (``|dx_array| <= radius`` and ``|dy_array| <= radius``, a square window, bounds included), in the order of the
  sample's ``obs`` (the reference filters its coordinate table, which keeps that order);
- **cells**: the ``k`` nearest cells by pixel coordinates (Euclidean), nearest first, less the cell itself, so
  ``k - 1`` neighbours (the reference's ``k = 45`` gives 44).

Every bag is then padded with zero rows up to the largest bag of the sample, and to at least one row: the reference
counts the neighbours of a spot that has none as one (its empty neighbour string splits into one empty name), so such
a spot gets one zero row. A zero row is a real input to the model (see ``MODEL_SPEC.md``, "Zero padding").
Instead of copying features, neighbours can be stored as ``neighbor_index`` ``(N, K)`` with ``-1`` for a zero row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from .data import load_bundle, save_bundle, save_bundles
from .errors import InputError, option_value
from .fileio import check_clobber, check_hdf5, numpy_error
from .modes import check_family

COORD_KEYS = ("x_array", "y_array", "x_pixel", "y_pixel")
#: The reference's number of nearest cells, the cell itself included.
DEFAULT_K = 45
#: The radius the reference's notebooks use for spots, in array coordinates.
DEFAULT_RADIUS = 1.0


@dataclass
class Features:
    """Tile features of every spot or cell of a sample, in ``obs`` order.

    Attributes:
        own: ``(N, D)`` float32, the spot's (row 0) or cell's features.
        subspot: ``(N, S, D)`` float32, the spot's sub-tiles (rows 1 onward); ``None`` for cells or when ``S`` is 0.
    """

    own: np.ndarray
    subspot: np.ndarray | None


def read_features(folder: str | Path, barcodes: Sequence[str], family: str = "spot") -> Features:
    """Read ``<folder>/<barcode>.npy`` for every barcode, in order.

    Raises:
        InputError: The folder is missing, a barcode has no file, a file is unreadable, or the files disagree in
            shape (the message names the file and both shapes).
    """
    check_family(family)
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such features folder")
    # A barcode names a file inside the folder, never a path: "../x", "/etc/x" or "a/b" would read elsewhere.
    unsafe = [b for b in barcodes if b in ("", ".", "..") or "/" in b or "\\" in b or "\0" in b]
    if unsafe:
        raise InputError(f"{folder}: barcode {unsafe[0][:80]!r} is a path, not a file name inside the folder")
    files = [folder / f"{b}.npy" for b in barcodes]
    missing = [b for b, f in zip(barcodes, files) if not f.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        # Barcodes are taken verbatim; a CSV written as "a, b" gives " b", which names another file than "b".
        spaced = next((b for b in missing if b != b.strip() and (folder / f"{b.strip()}.npy").is_file()), None)
        hint = "" if spaced is None else (
            f"; {spaced.strip() + '.npy'!r} exists, but barcodes are taken verbatim and {spaced!r} has spaces around "
            "it (a CSV written as 'a, b'?)"
        )  # fmt: skip
        raise InputError(
            f"{folder}: no features file for barcode(s) {', '.join(map(repr, missing[:3]))}{more} "
            f"(expected {folder / (missing[0] + '.npy')}){hint}"
        )
    if not files:
        raise InputError(f"{folder}: no barcodes to read")
    own = sub = None
    first_shape = None
    for i, f in enumerate(files):
        x = _load_npy(f)
        if family == "cell" and x.ndim == 2 and x.shape[0] == 1:
            x = x[0]
        if (family == "cell" and x.ndim != 1) or (family == "spot" and x.ndim not in (1, 2)):
            expected = "(D,) or (1, D)" if family == "cell" else "(1 + S, D)"
            raise InputError(f"{f}: features of shape {x.shape}; a {family} file holds {expected}")
        if family == "spot" and x.ndim == 1:
            x = x[None, :]
        if first_shape is None:
            first_shape = x.shape
            own = np.empty((len(files), x.shape[-1]), dtype=np.float32)
            if family == "spot" and x.shape[0] > 1:
                sub = np.empty((len(files), x.shape[0] - 1, x.shape[-1]), dtype=np.float32)
        elif x.shape != first_shape:
            raise InputError(f"{f}: features of shape {x.shape}, but {files[0]} has {first_shape}; all must agree")
        if family == "cell":
            own[i] = x
        else:
            own[i] = x[0]
            if sub is not None:
                sub[i] = x[1:]
    return Features(own, sub)


def _load_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({numpy_error(e)})") from None
    if x.dtype.kind not in "fiu":
        raise InputError(f"{path}: features must be numbers, got {x.dtype}")
    return x


# -- neighbours ---------------------------------------------------------------------------------------------------
def spot_neighbor_lists(x_array: np.ndarray, y_array: np.ndarray, radius: float = DEFAULT_RADIUS):
    """Neighbours of every spot as the reference chooses them: a square window of ``radius`` in array coordinates.

    Returns:
        ``(flat, counts)``: the neighbour positions of spot 0, then of spot 1, ..., each in ascending order (the order
        of ``obs``), and how many each spot has.
    """
    pts = _points(x_array, y_array, "x_array/y_array")
    n = len(pts)
    if radius < 0:
        raise InputError(f"radius must be non-negative, got {radius}")
    # Chebyshev distance <= radius is the reference's box query; i < j pairs, so the spot itself never appears.
    pairs = cKDTree(pts).query_pairs(r=float(radius), p=np.inf, output_type="ndarray")
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((dst, src))
    counts = np.bincount(src, minlength=n)
    return dst[order].astype(np.int64), counts.astype(np.int64)


def cell_neighbor_index(x_pixel: np.ndarray, y_pixel: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """The ``k`` nearest cells by pixel coordinates, nearest first, less the cell itself: ``(N, k - 1)`` int64.

    Like the reference, ``k`` counts the cell itself. The reference drops the first of the ``k`` nearest, assuming it
    is the cell; here the cell itself is dropped wherever it appears (two cells at the same position otherwise
    could swap), and the farthest when it does not. With fewer than ``k`` cells in the sample, missing neighbours
    are ``-1`` (the reference fails there).
    """
    if k < 2:
        raise InputError(f"k must be at least 2 (it counts the cell itself), got {k}")
    pts = _points(x_pixel, y_pixel, "x_pixel/y_pixel")
    n = len(pts)
    kq = min(k, n)
    _, idx = cKDTree(pts).query(pts, k=kq)
    idx = np.asarray(idx, dtype=np.int64).reshape(n, kq)
    is_self = idx == np.arange(n)[:, None]
    # Rows without the cell itself (ties at distance 0) drop their farthest entry instead, to keep k - 1.
    is_self[~is_self.any(axis=1), -1] = True
    out = idx[~is_self].reshape(n, kq - 1)
    if kq < k:
        out = np.concatenate([out, np.full((n, k - kq), -1, dtype=np.int64)], axis=1)
    return out


def pad_neighbor_lists(flat: np.ndarray, counts: np.ndarray, width: int | None = None) -> np.ndarray:
    """Lists of neighbours as ``(N, K)`` int64, ``-1`` after each list's end.

    ``K`` is ``width`` if given, else the longest list, and at least 1 (the reference pads a spot without neighbours
    to one zero row).

    Raises:
        InputError: A list is longer than ``width``.
    """
    longest = int(counts.max()) if len(counts) else 0
    k = max(1, longest) if width is None else int(width)
    if width is not None and longest > k:
        raise InputError(f"an item has {longest} neighbours, more than max_neighbors={k}")
    n = len(counts)
    out = np.full((n, k), -1, dtype=np.int64)
    rows = np.repeat(np.arange(n), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, dtype=np.int64)
    cols = np.arange(len(flat)) - np.repeat(starts, counts)
    out[rows, cols] = flat
    return out


def gather_neighbors(features: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``(N, K, D)`` neighbour features from ``(M, D)`` features and an ``(N, K)`` index; ``-1`` gives a zero row.

    Only the result is allocated (no copy of the features with a zero row appended), so gathering a block of
    ``index``'s rows at a time (:class:`NeighborBags`) costs that block alone.
    """
    features = np.asarray(features)
    index = np.asarray(index)
    if features.ndim == 3 and features.shape[1] == 1:
        features = features[:, 0]
    if len(features) == 0:
        return np.zeros((*index.shape, features.shape[-1]), dtype=features.dtype)
    bags = features[np.maximum(index, 0)]  # (N, K, D); -1 takes row 0 here, and is zeroed next
    bags[index < 0] = 0
    return bags


@dataclass(frozen=True)
class NeighborBags:
    """The dense neighbour bags ``gather_neighbors(features, index)``, ``(N, K, D)``, made a block of rows at a time
    as a bundle writer asks for them (a :class:`deepspot.data.RowSource`): K times the features' size (44 times for
    Xenium) is never in memory at once."""

    features: np.ndarray  # (M, D) or (M, 1, D)
    index: np.ndarray  # (N, K) int64, -1 for a zero row

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.index.shape, self.features.shape[-1])

    @property
    def dtype(self) -> np.dtype:
        return self.features.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return gather_neighbors(self.features, self.index[start:stop])


def check_coordinates(barcodes: Sequence[str], coords: Mapping[str, np.ndarray], source: str = "obs") -> None:
    """Refuse a NaN or infinite coordinate, naming the column and the first item that has one.

    A bundle's coordinates choose neighbours, match tiles and become the predictions' ``obsm["spatial"]``; a missing
    one would silently give an item wrong neighbours or tile, or none on a plot.
    """
    from .anndata_io import COORD_ALIASES

    for name in COORD_KEYS:
        if name not in coords:
            continue
        values = np.asarray(coords[name], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            aliases = "".join(f" ({a})" for a, target in COORD_ALIASES.items() if target == name)
            raise InputError(f"{source}: {bad.size} item(s) have a NaN or infinite {name}{aliases}; the first is "
                             f"{barcodes[int(bad[0])]!r}")  # fmt: skip


def _points(a: np.ndarray, b: np.ndarray, what: str) -> np.ndarray:
    pts = np.column_stack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    if not np.isfinite(pts).all():
        raise InputError(f"{what} coordinates hold NaN or infinite values")
    return pts


# -- bundle -------------------------------------------------------------------------------------------------------
def build_bundle(
    features: str | Path,
    barcodes: Sequence[str],
    coords: Mapping[str, np.ndarray],
    family: str = "spot",
    radius: float = DEFAULT_RADIUS,
    k: int = DEFAULT_K,
    index: bool = False,
    max_neighbors: int | None = None,
    source: str = "obs",
    feats: Features | None = None,
    dtype: str = "fp32",
) -> dict[str, np.ndarray]:
    """Build bundle arrays from a reference-style features folder and a sample's coordinates.

    Args:
        features: Folder with one ``<barcode>.npy`` per spot or cell.
        barcodes: Barcodes of the sample, in ``obs`` order (the bundle's order).
        coords: Coordinate arrays by name (``x_array``, ``y_array`` for spots; ``x_pixel``, ``y_pixel`` for cells).
        family: ``spot`` or ``cell``.
        radius: Spots: the neighbour window in array coordinates.
        k: Cells: the number of nearest cells, the cell itself included.
        index: Store ``neighbor_index`` ``(N, K)`` (``-1`` for padding) instead of ``neighbors`` ``(N, K, D)``.
        max_neighbors: Pad every bag to this many rows instead of the sample's largest bag. The reference pads to the
            largest bag of its whole data set, so give that number to reproduce one slide of several.
        source: Name of the coordinates' file, for messages.
        feats: Features already read and put in ``barcodes``' order (from an ``.h5``); else read from ``features``.
        dtype: The features' dtype in the bundle (``fp32`` or ``fp16``), cast before the neighbour bags are
            gathered, so that ``(N, K, D)`` bags are made once, in that dtype.

    Returns:
        ``spot`` ``(N, 1, D)`` (and ``subspot`` ``(N, S, D)``) or ``cell`` ``(N, 1, D)``; ``neighbors`` or
        ``neighbor_index``; ``barcode``; and the coordinates that were given. All in memory: :func:`write_bundle`
        writes the dense ``neighbors`` a block at a time instead.

    Raises:
        InputError: Duplicate barcodes, missing coordinates, missing or inconsistent feature files.
    """
    arrays = _bundle_arrays(features, barcodes, coords, family, radius, k, index, max_neighbors, source, feats, dtype)
    if isinstance(arrays.get("neighbors"), NeighborBags):
        arrays["neighbors"] = arrays["neighbors"].rows(0, len(arrays["barcode"]))
    return arrays


def _bundle_arrays(features, barcodes, coords, family, radius, k, index, max_neighbors, source, feats,
                   dtype) -> dict[str, np.ndarray | NeighborBags]:  # fmt: skip
    """:func:`build_bundle`'s arrays, with dense ``neighbors`` as :class:`NeighborBags`, made as they are written."""
    check_family(family)
    barcodes = [str(b) for b in barcodes]
    n = len(barcodes)
    if n == 0:
        raise InputError(f"{source}: holds no barcodes")
    seen: set[str] = set()
    dupes = [b for b in barcodes if b in seen or seen.add(b)]
    if dupes:
        raise InputError(f"{source}: barcode {dupes[0]!r} appears more than once")
    needed = ("x_array", "y_array") if family == "spot" else ("x_pixel", "y_pixel")
    absent = [c for c in needed if c not in coords]
    if absent:
        raise InputError(f"{source}: no {' or '.join(absent)} coordinates, which {family} neighbours need")
    for name, values in coords.items():
        if len(values) != n:
            raise InputError(f"{source}: {name} has {len(values)} values for {n} barcodes")
    check_coordinates(barcodes, coords, source)
    if max_neighbors is not None and max_neighbors < 1:
        raise InputError(f"max_neighbors must be positive, got {max_neighbors}")

    feats = feats if feats is not None else read_features(features, barcodes, family)
    if dtype != "fp32":
        from .data import cast_features

        cast = cast_features({"spot": feats.own} | ({} if feats.subspot is None else {"subspot": feats.subspot}), dtype)
        feats = Features(cast["spot"], cast.get("subspot"))
    if family == "spot":
        flat, counts = spot_neighbor_lists(coords["x_array"], coords["y_array"], radius)
        try:
            nb_index = pad_neighbor_lists(flat, counts, max_neighbors)
        except InputError:
            worst = int(np.argmax(counts))
            raise InputError(
                f"{source}: spot {barcodes[worst]!r} has {counts[worst]} neighbours within radius {radius}, "
                f"more than {option_value('max_neighbors', max_neighbors)}"
            ) from None
    else:
        nb_index = cell_neighbor_index(coords["x_pixel"], coords["y_pixel"], k)
        if max_neighbors is not None:
            if max_neighbors < nb_index.shape[1]:
                raise InputError(f"{source}: k={k} gives {k - 1} neighbours, more than "
                                 f"{option_value('max_neighbors', max_neighbors)}")  # fmt: skip
            extra = np.full((n, max_neighbors - nb_index.shape[1]), -1, dtype=np.int64)
            nb_index = np.concatenate([nb_index, extra], axis=1)

    own = "spot" if family == "spot" else "cell"
    arrays: dict[str, np.ndarray] = {own: feats.own[:, None, :]}
    if feats.subspot is not None:
        arrays["subspot"] = feats.subspot
    if index:
        arrays["neighbor_index"] = nb_index
    else:
        arrays["neighbors"] = NeighborBags(feats.own, nb_index)
    arrays["barcode"] = np.asarray(barcodes, dtype=str)
    for name in COORD_KEYS:
        if name in coords:
            arrays[name] = np.asarray(coords[name])
    return arrays


def read_h5_features(path: str | Path, coords: Mapping[str, np.ndarray], source: str = "obs",
                     tolerance: float | None = None, dtype: str = "fp32") -> Features:  # fmt: skip
    """Per-slide tile features as TRIDENT and CLAM write them, matched to spots or cells by position.

    The ``.h5`` holds ``features`` ``(T, D)`` and ``coords`` ``(T, 2)``: each tile's top-left corner ``(x, y)`` in
    level-0 pixels, with the tile's size in the ``patch_size_level0`` (TRIDENT) or ``patch_size`` (CLAM) attribute;
    without one, coordinates are taken as tile centres. An item at pixel row ``x_pixel`` and column ``y_pixel`` (the
    reference's names) takes the tile whose centre is nearest along both axes (the Chebyshev distance), within
    ``tolerance`` pixels on each axis (default: half a tile, so an item takes the tile it lies in; 1 px for centres).
    The model's input is a tile centred on its item, so each item needs its own tile (tiles extracted at the items'
    positions): a grid tiling with several items in one tile is refused, not silently shared. The ``.h5`` has no
    sub-tiles, so the bundle has no ``subspot`` array.

    Only the matched tiles' features are kept, read a block of tiles at a time straight into a ``dtype`` array
    (``fp32`` or ``fp16``) in the items' order: memory holds the bundle's features once, not the file's features, a
    copy in the items' order and a cast.

    Raises:
        InputError: Missing datasets or coordinates, an item with no tile within the tolerance, or a tile claimed
            by two items; the message names the first.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such features file")
    for name in ("x_pixel", "y_pixel"):
        if name not in coords:
            raise InputError(f"{source}: matching tiles by position needs pixel coordinates (x_pixel, y_pixel)")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise InputError(f"{path}: an .h5 of tile features holds 'features' (T, D) and 'coords' (T, 2)")
            check_hdf5(f, path, ("features", "coords"))
            shape = f["features"].shape
            tiles = np.asarray(f["coords"], dtype=np.float64)
            attrs = dict(f["coords"].attrs)
            if len(shape) != 2 or tiles.shape != (shape[0], 2):
                raise InputError(f"{path}: features {shape} and coords {tiles.shape} do not describe the same tiles")
            nearest = _match_tiles(path, tiles, attrs, coords, tolerance)
            return Features(_read_rows(f["features"], nearest, dtype, path), None)
    except OSError as e:
        raise InputError(f"{path}: not a readable .h5 file ({e})") from None


def _match_tiles(path: Path, tiles: np.ndarray, attrs: Mapping, coords: Mapping[str, np.ndarray],
                 tolerance: float | None) -> np.ndarray:  # fmt: skip
    """The tile of each item (see :func:`read_h5_features`)."""
    from scipy.spatial import cKDTree

    size = attrs.get("patch_size_level0", attrs.get("patch_size"))
    size = float(np.asarray(size).reshape(-1)[0]) if size is not None else None
    centres = tiles + (size / 2 if size else 0.0)
    tol = tolerance if tolerance is not None else (size / 2 if size else 1.0)
    points = np.column_stack([coords["y_pixel"], coords["x_pixel"]])  # (x, y) = (column, row)
    dist, nearest = cKDTree(centres).query(points, p=np.inf)  # the largest per-axis offset: inside the tile or not
    far = np.nonzero(dist > tol)[0]
    if far.size:
        i = int(far[0])
        raise InputError(
            f"{path}: {far.size} item(s) have no tile within {tol:g} px; the first, at row {coords['x_pixel'][i]:g}, "
            f"column {coords['y_pixel'][i]:g}, is {dist[i]:.1f} px from the nearest tile centre on one axis"
        )
    taken, counts = np.unique(nearest, return_counts=True)
    if (counts > 1).any():
        first = int(np.argmax(counts > 1))
        tile = int(taken[first])
        raise InputError(f"{path}: tile {tile} at {tiles[tile].tolist()} holds {int(counts[first])} items; the model "
                         "takes a tile centred on each item, so extract the tiles at the items' positions, one per "
                         "item, not on a grid")  # fmt: skip
    return nearest


#: Bytes of an ``.h5``'s features read at a time.
H5_BLOCK_BYTES = 32 << 20


def _read_rows(dataset, rows: np.ndarray, dtype: str, path: Path) -> np.ndarray:
    """``dataset[rows]`` as a ``dtype`` array, reading ``H5_BLOCK_BYTES`` of the dataset at a time: each block's
    wanted rows go straight to their places (each tile belongs to one item at most, as checked)."""
    from ._pages import row_blocks
    from .data import check_fp16_range, feature_dtype

    target = feature_dtype(dtype)
    if dataset.dtype.kind not in "fiu":
        raise InputError(f"{path}: features must be numbers, got {dataset.dtype}")
    t, d = dataset.shape
    out = np.empty((len(rows), d), dtype=target)
    item_of = np.full(t, -1, dtype=np.int64)
    item_of[rows] = np.arange(len(rows))
    wanted = np.flatnonzero(item_of >= 0)
    for start, stop in row_blocks(t, d * max(4, dataset.dtype.itemsize), H5_BLOCK_BYTES):
        lo, hi = np.searchsorted(wanted, [start, stop])
        if lo == hi:
            continue  # no item's tile in this block: not read
        block = np.asarray(dataset[start:stop], dtype=np.float32)[wanted[lo:hi] - start]
        out[item_of[wanted[lo:hi]]] = check_fp16_range(block, target, f"{path}: 'features'")
    return out


def _select(barcodes: list[str], columns: dict[str, np.ndarray], keep: np.ndarray):
    return [b for b, k in zip(barcodes, keep) if k], {name: values[keep] for name, values in columns.items()}


def _read_sample(obs, by: str | None, all_spots: bool):
    from .anndata_io import read_obs

    barcodes, columns = read_obs(obs, extra=(by,) if by else ())
    seen: set[str] = set()
    for barcode in barcodes:  # features are found by barcode: a repeated one would give two items the same tile
        if barcode in seen:
            raise InputError(f"{obs}: barcode {barcode!r} appears more than once; barcodes name the items")
        seen.add(barcode)
    if "in_tissue" in columns and not all_spots:
        barcodes, columns = _select(barcodes, columns, columns["in_tissue"] > 0)
        if not barcodes:
            raise InputError(f"{obs}: no spot has in_tissue set; {option_value('all_spots', True)} keeps them all")
    return barcodes, columns


def _build(features, names, columns, family, radius, k, index, max_neighbors, dtype, source):
    """A sample's bundle arrays as :func:`save_bundle` writes them: dense ``neighbors`` as :class:`NeighborBags`."""
    from .data import cast_features

    coords = {c: v for c, v in columns.items() if c in COORD_KEYS}
    # A file is never a folder of .npy files: whatever its name (.h5, .hdf5, .h5ad), it is read as a slide's .h5.
    h5 = Path(features).is_file() or Path(features).suffix.lower() in (".h5", ".hdf5")
    check_coordinates(names, coords, source)  # before the tiles are matched by position
    feats = read_h5_features(features, coords, source, dtype=dtype) if h5 else None
    arrays = _bundle_arrays(features, names, coords, family, radius, k, index, max_neighbors, source, feats, dtype)
    return cast_features(arrays, dtype)


def write_bundle(
    out: str | Path,
    features: str | Path,
    obs: str | Path,
    family: str = "spot",
    radius: float = DEFAULT_RADIUS,
    k: int = DEFAULT_K,
    index: bool = False,
    max_neighbors: int | None = None,
    dtype: str = "fp32",
    all_spots: bool = False,
) -> dict[str, np.ndarray]:
    """Read coordinates from ``obs`` (``.h5ad`` or ``.csv``), build the bundle and write it to ``out`` atomically.

    ``features`` is the reference's folder of ``<barcode>.npy`` files, or a TRIDENT/CLAM ``.h5`` of the slide's tiles
    (see :func:`read_h5_features`). Spots with ``in_tissue`` 0 are left out unless ``all_spots``. Features are stored
    as ``dtype`` (``fp32`` or ``fp16``). Everything is checked before anything is written. The dense ``neighbors``
    are gathered a block of rows at a time straight into the output, so memory holds the features and one block, not
    the bundle. Returns the arrays written, memory-mapped from ``out``.
    """
    barcodes, columns = _read_sample(obs, None, all_spots)
    arrays = _build(features, barcodes, columns, family, radius, k, index, max_neighbors, dtype, str(obs))
    save_bundle(out, arrays)
    del arrays
    return load_bundle(out).arrays


def write_sample_bundles(
    out: str | Path,
    features: str | Path,
    obs: str | Path,
    by: str = "sampleID",
    family: str = "spot",
    radius: float = DEFAULT_RADIUS,
    k: int = DEFAULT_K,
    index: bool = False,
    max_neighbors: int | None = None,
    dtype: str = "fp32",
    all_spots: bool = False,
    no_clobber: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """The reference's multi-sample layout: one bundle per value of ``obs[by]``, ``out/<sample>.npz``, each with its
    neighbours chosen within the sample; as :func:`write_bundle` otherwise. With ``no_clobber``, a sample whose bundle
    exists is refused before any is written. Returns the arrays written by sample, memory-mapped."""
    barcodes, columns = _read_sample(obs, by, all_spots)
    if by not in columns:
        raise InputError(f"{obs}: no {by!r} column to split the samples by")
    groups = [str(g) for g in columns[by]]
    names = list(dict.fromkeys(groups))
    bad = [g for g in names if g in ("", ".", "..") or "/" in g or "\\" in g]
    if bad:
        raise InputError(f"{obs}: sample name {bad[0]!r} cannot name a file")
    for name in names:
        check_clobber(Path(out) / f"{name}.npz", no_clobber)
    built = {}
    for name in names:  # all built (and checked) before any is written; dense bags are gathered as they are written
        sub_barcodes, sub_columns = _select(barcodes, columns, np.array([g == name for g in groups]))
        built[name] = _build(features, sub_barcodes, sub_columns, family, radius, k, index, max_neighbors, dtype,
                             f"{obs} (sample {name})")  # fmt: skip
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_bundles({out / f"{name}.npz": arrays for name, arrays in built.items()}, no_clobber=no_clobber)
    except BaseException:
        if made:  # nothing of this run is left: the folder it made goes too (it is empty, or is not removed)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    del built
    return {name: load_bundle(out / f"{name}.npz").arrays for name in names}
