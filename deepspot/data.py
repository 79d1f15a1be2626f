"""Feature bundles: the data format for training and inference.

A bundle is a ``.npz`` file or a directory of ``.npy`` files (memory-mapped when read) holding:

- ``spot`` or ``cell``: ``(N, D)`` or ``(N, 1, D)`` (for the ``spot`` mode also ``(N, T, D)``);
- ``subspot`` ``(N, S, D)`` and ``neighbors`` ``(N, K, D)``, as the mode needs; or, instead of ``neighbors``,
  ``neighbor_index`` ``(N, K)`` int64 with the positions of each item's neighbours in the bundle (``-1``: a zero row);
- ``target`` ``(N, G)`` for training;
- optionally ``barcode`` ``(N,)`` and ``genes`` ``(G,)`` (strings).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ._pages import release_rows, row_blocks
from .checks import at_least, check_memory
from .errors import DeepSpotError, InputError, UnusedInputWarning, option, option_value
from .fileio import (
    OBJECT_ARRAY_HINT,
    atomic_path,
    ensure_free_space,
    is_short_write,
    numpy_error,
    short_write,
    temporary_folder,
)
from .modes import Mode, get_mode

FEATURE_KEYS = ("spot", "cell", "subspot", "neighbors")
from .limits import MAX_BAG  # noqa: E402  (the default lives in a NumPy-free module the CLI imports)
KNOWN_KEYS = FEATURE_KEYS + ("neighbor_index", "target", "barcode", "genes", "x_array", "y_array", "x_pixel", "y_pixel")


@dataclass
class Bundle:
    """Arrays of a feature bundle, by name; read lazily and memory-mapped where the format allows.

    Attributes:
        arrays: The bundle's arrays.
        path: Where it was read from (``None`` for an in-memory bundle).
    """

    arrays: dict[str, np.ndarray]
    path: Path | None = None
    _source: str = field(default="bundle", repr=False)

    def __post_init__(self):
        self._source = str(self.path) if self.path is not None else "bundle"

    def __repr__(self) -> str:  # the arrays' shapes, not their values (a slide's would fill the screen)
        arrays = ", ".join(f"{k}: {a.shape} {a.dtype}" for k, a in self.arrays.items())
        return f"Bundle({self._source}, {{{arrays}}})"

    @property
    def source(self) -> str:
        """What messages call the bundle: its path, or ``bundle`` for one made in memory."""
        return self._source

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def n(self) -> int:
        for key in ("spot", "cell", "target"):
            if key in self.arrays:
                return int(self.arrays[key].shape[0])
        raise InputError(f"{self._source}: has neither 'spot', 'cell' nor 'target'")

    @property
    def genes(self) -> list[str] | None:
        return None if "genes" not in self.arrays else [str(g) for g in self.arrays["genes"]]

    @property
    def barcodes(self) -> list[str] | None:
        return None if "barcode" not in self.arrays else [str(b) for b in self.arrays["barcode"]]

    @property
    def layout(self) -> str:
        """``indexed`` when neighbours are given by ``neighbor_index``, else ``dense``."""
        return "indexed" if "neighbor_index" in self.arrays and "neighbors" not in self.arrays else "dense"

    def inputs(self, mode: Mode) -> dict[str, np.ndarray]:
        """The model inputs of ``mode``, by name, with single-tile bags shaped ``(N, 1, D)`` (views, no copies)."""
        out = {}
        for bag in mode.bags:
            a = self.arrays[bag.name]
            out[bag.name] = a[:, None, :] if a.ndim == 2 else a
        return out

    def validate(
        self,
        family: str,
        mode: str | Mode,
        input_size: int | None = None,
        output_size: int | None = None,
        require_target: bool = False,
        allow_index: bool = False,
    ) -> Mode:
        """Check the bundle against a model's family and mode; raise :class:`InputError` naming the problem.

        Args:
            family: ``spot`` or ``cell``.
            mode: The model's mode.
            input_size: The model's feature size ``D``, if known.
            output_size: The model's number of genes ``G``, if known (checked against ``target`` and ``genes``).
            require_target: Whether ``target`` must be there (training).
            allow_index: Whether ``neighbor_index`` may stand in for ``neighbors``.
        """
        m = mode if isinstance(mode, Mode) else get_mode(family, mode)
        src = self._source
        other = "cell" if m.family == "spot" else "spot"
        own = "spot" if m.family == "spot" else "cell"
        if own not in self.arrays and other in self.arrays:
            raise InputError(f"{src}: holds {other!r} features, but the model is a {m.family} model (needs {own!r})")
        if allow_index and m.has_neighbors and "neighbors" in self.arrays and "neighbor_index" in self.arrays:
            raise InputError(f"{src}: holds both 'neighbors' and 'neighbor_index', the neighbours given twice (which "
                             "one runs would depend on the layout); keep one")  # fmt: skip
        n = None
        for bag in m.bags:
            if bag.name == "neighbors" and "neighbors" not in self.arrays and "neighbor_index" in self.arrays:
                if not allow_index:
                    raise InputError(
                        f"{src}: neighbours are given as 'neighbor_index', which only whole-slide inference reads; "
                        "this step needs neighbour features ('neighbors')"
                    )
                continue
            if bag.name not in self.arrays:
                raise InputError(f"{src}: missing {bag.name!r}, which mode {m.reference!r} needs")
            a = self.arrays[bag.name]
            if a.dtype.kind != "f":
                raise InputError(f"{src}: {bag.name!r} must be floating point, got {a.dtype}")
            if bag.single and bag.name == own:
                ok = a.ndim == 2 or (a.ndim == 3 and a.shape[1] == 1)
                shape = "(N, D) or (N, 1, D)"
            elif bag.name == own:  # the `spot` mode pools a bag of spot tiles
                ok = a.ndim in (2, 3)
                shape = "(N, D) or (N, T, D)"
            else:
                ok = a.ndim == 3
                shape = f"(N, {bag.name[0].upper()}, D)"
            if not ok:
                raise InputError(f"{src}: {bag.name!r} must have shape {shape}, got {a.shape}")
            if a.shape[1 if a.ndim == 3 else 0] == 0 and a.ndim == 3:
                raise InputError(f"{src}: {bag.name!r} has an empty bag axis: {a.shape}")
            if input_size is not None and a.shape[-1] != input_size:
                raise InputError(f"{src}: {bag.name!r} has {a.shape[-1]} features, the model expects {input_size}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise InputError(f"{src}: {bag.name!r} has {a.shape[0]} rows, {m.bags[0].name!r} has {n}")
        for key, length in (("target", n), ("barcode", n)):
            if key in self.arrays and self.arrays[key].shape[0] != length:
                raise InputError(f"{src}: {key!r} has {self.arrays[key].shape[0]} rows, the features have {length}")
        if require_target and "target" not in self.arrays:
            raise InputError(f"{src}: missing 'target', which training needs")
        if "target" in self.arrays:
            t = self.arrays["target"]
            if t.ndim != 2:
                raise InputError(f"{src}: 'target' must have shape (N, G), got {t.shape}")
            if output_size is not None and t.shape[1] != output_size:
                raise InputError(f"{src}: 'target' has {t.shape[1]} genes, the model predicts {output_size}")
        if "genes" in self.arrays:
            g = self.arrays["genes"]
            width = self.arrays["target"].shape[1] if "target" in self.arrays else output_size
            if width is not None and g.shape[0] != width:
                raise InputError(f"{src}: 'genes' has {g.shape[0]} names for {width} genes")
        taken = {bag.name for bag in m.bags} | ({"neighbor_index"} if m.has_neighbors and allow_index else set())
        unused = [k for k in (*FEATURE_KEYS, "neighbor_index") if k in self.arrays and k not in taken]
        if unused:
            warnings.warn(
                f"{src}: ignoring {', '.join(map(repr, unused))}: a {m.family}/{m.name} model does not take "
                f"{'it' if len(unused) == 1 else 'them'} (it takes {', '.join(b.name for b in m.bags)})",
                UnusedInputWarning,
                stacklevel=2,
            )
        return m


def load_bundle(path: str | Path, mmap: bool = True) -> Bundle:
    """Read a bundle from a ``.npz`` file or a directory of ``.npy`` files (memory-mapped with ``mmap``).

    Args:
        path: The ``.npz`` file or the folder.
        mmap: Memory-map the arrays (``.npy`` files, and ``.npz`` members stored uncompressed) instead of reading
            them into memory.

    Returns:
        A :class:`Bundle`: ``bundle["spot"]``, ``bundle.n``, ``bundle.barcodes``, ``bundle.genes``; it is checked
        against a model by :meth:`Bundle.validate`, and :func:`deepspot.runtime.infer` takes it as it is.

    Raises:
        InputError: The path is missing, not a bundle, or an array cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such bundle (expected a .npz file or a directory of .npy files)")
    arrays: dict[str, np.ndarray] = {}
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise InputError(f"{path}: directory holds no .npy files")
            for f in files:
                try:
                    arrays[f.stem] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    raise InputError(f"{f}: not a readable bundle array ({numpy_error(e)})") from None
        else:
            arrays = _read_npz(path, mmap)
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable bundle ({numpy_error(e)})") from None
    except Exception as e:  # zipfile.BadZipFile and friends from a corrupt .npz
        raise InputError(f"{path}: not a readable bundle ({type(e).__name__}: {e})") from None
    unknown = [k for k in arrays if k not in KNOWN_KEYS]
    if unknown:
        raise InputError(f"{path}: unknown array {unknown[0]!r}; a bundle holds {', '.join(KNOWN_KEYS)}")
    return Bundle(arrays, path)


def as_bundle(bundle: Bundle | Mapping[str, np.ndarray] | str | Path, mmap: bool = True) -> Bundle:
    """A :class:`Bundle` from a path (read with :func:`load_bundle`), a :class:`Bundle` (as it is) or arrays by name
    (in memory, with a file's names: ``spot``, ``subspot``, ``neighbors``, ``barcode``, ...).

    Raises:
        InputError: A path that is no bundle, or an array name a bundle does not hold.
        TypeError: Anything else.
    """
    if isinstance(bundle, Bundle):
        return bundle
    if isinstance(bundle, (str, os.PathLike)):
        return load_bundle(bundle, mmap=mmap)
    if isinstance(bundle, Mapping):
        _check_keys(bundle)
        return Bundle({k: np.asarray(v) for k, v in bundle.items()})
    raise TypeError(f"expected a bundle's path, a deepspot.data.Bundle or arrays by name, not a {type(bundle).__name__}")


def _read_npz(path: Path, mmap: bool) -> dict[str, np.ndarray]:
    """Read a ``.npz``; members stored uncompressed (``np.savez``) are memory-mapped in place when ``mmap``."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a .npz bundle (expected a .npz file or a directory of .npy files)")
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            if mmap and info.compress_type == zipfile.ZIP_STORED:
                # Local file header: 30 bytes, then the name and the extra field, then the .npy bytes.
                raw.seek(info.header_offset)
                header = raw.read(30)
                start = info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                start += int.from_bytes(header[28:30], "little")
                raw.seek(start)
                version = np.lib.format.read_magic(raw)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else (np.lib.format.read_array_header_2_0)
                )
                shape, fortran, dtype = read_header(raw)
                if dtype.hasobject:
                    raise InputError(f"{path}: array {key!r} holds Python objects (np.asarray(adata.obs_names) is "
                                     f"one), which bundles never do; {OBJECT_ARRAY_HINT}")  # fmt: skip
                # The header's shape must be what the member stores: a larger one would map the next member's bytes.
                stored = info.file_size - (raw.tell() - start)
                claimed = math.prod(shape) * dtype.itemsize
                if claimed != stored:
                    raise InputError(
                        f"{path}: array {key!r} claims shape {shape} ({claimed} bytes) but its member stores {stored}"
                    )
                if claimed == 0:
                    arrays[key] = np.zeros(shape, dtype=dtype)
                else:
                    order = "F" if fortran else "C"
                    arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order=order)
            else:
                with zf.open(info) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    return arrays


#: Dtypes a bundle's features may be stored in (``--dtype``). fp16 halves the bytes read from disk and sent to a
#: GPU; graphs exported with ``--io fp16`` take them as they are, fp32 graphs cast each batch.
FEATURE_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def cast_features(arrays: Mapping[str, np.ndarray], dtype: str = "fp32") -> dict[str, np.ndarray]:
    """The arrays with the feature arrays (``spot``, ``cell``, ``subspot``, ``neighbors``) in ``dtype``; a
    :class:`RowSource` is cast a block of rows at a time when it is written, and its range is checked then.

    Raises:
        InputError: An unknown dtype, or a feature beyond float16's range (it would become inf).
    """
    target = feature_dtype(dtype)
    out = dict(arrays)
    for key in FEATURE_KEYS:
        if key in out and isinstance(out[key], RowSource) and out[key].dtype != target:
            out[key] = _CastRows(out[key], target, repr(key))  # cast a block at a time as it is written
        elif key in out and out[key].dtype != target:
            a = np.asarray(out[key])
            cast = np.empty(a.shape, dtype=target)
            # A block of rows at a time: the range check makes no full-size |a| beside the two arrays.
            if a.ndim == 0:
                cast[...] = check_fp16_range(a, target, repr(key))
            for start, stop in row_blocks(len(a) if a.ndim else 0, a[:1].nbytes if a.ndim else 0, SYNTH_BLOCK_BYTES):
                cast[start:stop] = check_fp16_range(a[start:stop], target, repr(key))
            out[key] = cast
    return out


def feature_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a features dtype name (``fp32``, ``fp16``).

    Raises:
        InputError: Another name.
    """
    if dtype not in FEATURE_DTYPES:
        raise InputError(f"unknown feature dtype {dtype!r}; expected one of: {', '.join(FEATURE_DTYPES)}")
    return np.dtype(FEATURE_DTYPES[dtype])


def check_fp16_range(block: np.ndarray, target: np.dtype, what: str) -> np.ndarray:
    """``block``, once checked to fit ``target``: a value beyond float16's range would become inf in an fp16 array.

    Raises:
        InputError: ``what`` holds such a value.
    """
    limit = np.finfo(np.float16).max
    if target == np.float16 and block.size and np.abs(block).max() > limit:
        raise InputError(f"{what} holds values beyond float16's range ({limit:g}); keep fp32")
    return block


#: Suffixes that name files of other kinds: a bundle "x.h5ad" or "x.npy" would be a folder of that name, surely a slip.
NOT_A_BUNDLE = (".npy", ".h5ad", ".h5", ".hdf5", ".csv", ".tsv", ".txt", ".json", ".onnx", ".safetensors", ".pkl",
                ".ckpt", ".pt", ".pth", ".plan", ".zip", ".yaml", ".yml")  # fmt: skip


def _check_keys(arrays: Mapping[str, np.ndarray]) -> None:
    unknown = [k for k in arrays if k not in KNOWN_KEYS]
    if unknown:
        raise InputError(f"unknown bundle array {unknown[0]!r}; a bundle holds {', '.join(KNOWN_KEYS)}")


@runtime_checkable
class RowSource(Protocol):
    """An array that a bundle writer takes a block of rows at a time, so it is never whole in memory: the dense
    neighbour bags gathered from the features (:class:`deepspot.layout.NeighborBags`, K times their size), or
    :func:`synth_bundle`'s neighbours drawn again."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (a writer asks for them in order, each once)."""
        ...


@dataclass(frozen=True)
class _CastRows:
    """A :class:`RowSource` cast to ``dtype`` a block at a time, checked as :func:`cast_features` checks."""

    source: RowSource
    dtype: np.dtype
    what: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return check_fp16_range(self.source.rows(start, stop), self.dtype, self.what).astype(self.dtype)


#: Bytes of an array a bundle writer takes at a time: the peak of writing is the arrays held plus one such block.
WRITE_BLOCK_BYTES = 32 << 20
#: errno values that mean the disk (or a file size limit) stopped a write.
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _bundle_array(key: str, value) -> np.ndarray | RowSource:
    """``value`` as written: a :class:`RowSource` as it is, anything else as an array that holds no Python objects
    (``np.savez`` would pickle those, and loading a bundle refuses them)."""
    if isinstance(value, RowSource):
        return value
    value = np.asarray(value)
    if value.dtype.hasobject:
        raise InputError(f"bundle array {key!r} holds Python objects, which bundles never do; {OBJECT_ARRAY_HINT}")
    return value


def _nbytes(value: np.ndarray | RowSource) -> int:
    return math.prod(value.shape) * np.dtype(value.dtype).itemsize


def _write_npy(f, value: np.ndarray | RowSource, block_bytes: int | None = None) -> None:
    """Write ``value`` to the open file ``f`` in NumPy's ``.npy`` format (C order, the header ``np.save`` writes), a
    block of rows at a time: a :class:`RowSource` makes each block only now, and a memory-mapped array gives back
    each block's pages once written."""
    dtype = np.dtype(value.dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(value.shape)}
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # a header over 64 KiB: format 2.0, as np.save then writes
        np.lib.format.write_array_header_2_0(f, header)
    if not value.shape:
        f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        return
    row_bytes = math.prod(value.shape[1:]) * dtype.itemsize
    for start, stop in row_blocks(value.shape[0], row_bytes, block_bytes or WRITE_BLOCK_BYTES):
        block = value.rows(start, stop) if isinstance(value, RowSource) else value[start:stop]
        f.write(np.ascontiguousarray(block, dtype=dtype).reshape(-1).view(np.uint8))
        if isinstance(value, np.ndarray):
            release_rows(value, start, stop)


def _write_failed(path: Path, member: str, e: OSError) -> DeepSpotError | None:
    """A write that the disk stopped, in one line naming the bundle and the array; ``None`` for another error."""
    if is_short_write(e):
        return DeepSpotError(f"{path}: {short_write(e)} while writing {member}")
    if e.errno in _DISK_FULL:
        return DeepSpotError(f"{path}: the write stopped ({e.strerror}) while writing {member}: the disk is full or a "
                             "file size limit (ulimit -f) was reached")  # fmt: skip
    return None


def _write_npz(tmp: Path, path: Path, arrays: Mapping[str, np.ndarray | RowSource]) -> None:
    """The arrays as ``tmp``, a ``.npz`` as ``np.savez`` writes it (members stored, not compressed, so a reader maps
    them in place), each member written a block of rows at a time."""
    where = "the .npz's header"
    try:  # around the zip too: closing it after a failed write writes again, and fails again
        with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in arrays.items():
                where = f"{key}.npy"
                with zf.open(where, "w", force_zip64=True) as member:
                    _write_npy(member, value)
            where = "the .npz's directory"
    except OSError as e:
        failed = _write_failed(path, where, e)
        if failed is None:
            raise
        raise failed from None


def _check_free_space(bundles: Mapping[Path, Mapping[str, np.ndarray | RowSource]]) -> None:
    """Refuse up front bundles that the free space of their folders cannot hold."""
    need: dict[Path, int] = {}
    for path, arrays in bundles.items():
        folder = path.parent if str(path.parent) else Path(".")
        need[folder] = need.get(folder, 0) + sum(_nbytes(v) for v in arrays.values())
    for folder, nbytes in need.items():
        ensure_free_space(folder, nbytes, "the bundle" if len(bundles) == 1 else f"{len(bundles)} bundles")


def save_bundles(bundles: Mapping[str | Path, Mapping[str, np.ndarray]], no_clobber: bool = False) -> None:
    """Write ``.npz`` bundles all or none: each goes to a temporary file beside its path, and they take their names
    only once every one is written, so a name the file system refuses (too long) or a full disk leaves none.

    Arrays are written a block of rows at a time (:data:`WRITE_BLOCK_BYTES`), and a :class:`RowSource` (the dense
    neighbour bags) is made block by block as it is written, so writing needs one block beside the arrays held.
    """
    bundles = {Path(path): {k: _bundle_array(k, v) for k, v in arrays.items()} for path, arrays in bundles.items()}
    for path, arrays in bundles.items():
        _check_keys(arrays)
        if path.suffix.lower() != ".npz":
            raise InputError(f"{path}: expected a .npz path")
    _check_free_space(bundles)
    with contextlib.ExitStack() as stack:  # renames on the way out, the last bundle's first; any error removes them
        temporaries = [stack.enter_context(atomic_path(path, no_clobber=no_clobber)) for path in bundles]
        for tmp, (path, arrays) in zip(temporaries, bundles.items()):
            _write_npz(tmp, path, arrays)


def save_bundle(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write arrays as a bundle, atomically: ``.npz`` for a path ending in ``.npz``, else a directory of ``.npy``;
    a block of rows at a time, as :func:`save_bundles` writes."""
    path = Path(path)
    _check_keys(arrays)
    if path.suffix.lower() in NOT_A_BUNDLE:
        raise InputError(f"{path}: a bundle is a .npz file or a folder of .npy files; {path.suffix} names neither")
    if path.suffix.lower() == ".npz":
        save_bundles({path: arrays})
        return path
    if path.exists():
        raise InputError(f"{path}: already exists; a bundle folder is never replaced (a .npz bundle is)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: output folder {parent} does not exist")
    arrays = {k: _bundle_array(k, v) for k, v in arrays.items()}
    _check_free_space({path: arrays})
    tmp = temporary_folder(path)
    try:
        for k, v in arrays.items():
            try:
                with open(tmp / f"{k}.npy", "wb") as f:
                    _write_npy(f, v)
            except OSError as e:
                failed = _write_failed(path, f"{k}.npy", e)
                if failed is None:
                    raise
                raise failed from None
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def synth_bundle(
    family: str,
    mode: str,
    n: int,
    input_size: int = 64,
    genes: int = 32,
    seed: int = 0,
    n_subspots: int = 9,
    n_neighbors: int | None = None,
    noise: float = 0.1,
    stream: bool = False,
) -> dict[str, np.ndarray]:
    """A seeded synthetic bundle with a learnable signal.

    Each item's tile features are standard normal. The target of an item is a non-linear function of its own
    features (and, where the mode has them, of its sub-spots' mean and its neighbours' maximum) plus Gaussian
    noise, so a model of the right mode can learn it and a mean predictor cannot.

    Args:
        family: ``spot`` or ``cell``.
        mode: Forward mode; decides which bags are written.
        n: Number of items.
        input_size: Features per tile ``D``.
        genes: Number of genes ``G``.
        seed: Seed of the generator (NumPy's PCG64; independent of torch's global state).
        n_subspots: Sub-spots per spot ``S``.
        n_neighbors: Neighbours per item ``K`` (default 6 for spots, 8 for cells).
        noise: Standard deviation of the noise added to the targets.
        stream: Give ``neighbors`` as a :class:`RowSource` that draws them again, a block at a time, as
            :func:`save_bundle` writes them (the same numbers), so the ``(N, K, D)`` bags are never in memory at once.

    Raises:
        ConfigError: A size below 1, a negative seed, or a bundle larger than the memory available.
    """
    m = get_mode(family, mode)
    k = n_neighbors if n_neighbors is not None else (6 if family == "spot" else 8)
    sizes = ((n, option("n")), (input_size, option("input_size")), (genes, option("genes")),
             (n_subspots, option("n_subspots", "--subspots")), (k, option("n_neighbors", "--neighbors")))  # fmt: skip
    for value, name in sizes:
        at_least(value, name)
    at_least(seed, option("seed"), 0)
    tiles = 1 + n_subspots * ("subspot" in m.input_names) + (1 if stream else k) * ("neighbors" in m.input_names)
    check_memory(4 * n * (tiles * input_size + genes),
                 f"a bundle of {option_value('n', n)} items with {tiles} tiles of "
                 f"{option_value('input_size', input_size)}")  # fmt: skip
    rng = np.random.default_rng(seed)
    own = m.bags[0].name
    # Hidden structure shared by all items, then per-item features.
    w_own = rng.standard_normal((input_size, genes)) / np.sqrt(input_size)
    w_ctx = rng.standard_normal((input_size, genes)) / np.sqrt(input_size)
    arrays: dict[str, np.ndarray] = {}
    # Drawn in blocks of rows straight into float32 arrays: the same numbers as one float64 draw per array (the
    # generator's stream is sequential), without a float64 copy of each array (2x its float32 size) beside it.
    x = arrays[own] = _normal_f32(rng, (n, input_size))
    if "subspot" in m.input_names:
        arrays["subspot"] = _normal_f32(rng, (n, n_subspots, input_size), add=x[:, None, :])
    nb_max = None  # with stream: each item's neighbours' maximum (N, D), which the targets need, kept instead
    if "neighbors" in m.input_names and stream:
        arrays["neighbors"] = _SynthNeighbors(rng, (n, k, input_size))
        nb_max = np.empty((n, input_size), dtype=np.float32)
        for start, stop in row_blocks(n, 8 * k * input_size, SYNTH_BLOCK_BYTES):  # drawn to move the generator on
            nb_max[start:stop] = rng.standard_normal((stop - start, k, input_size)).astype(np.float32).max(axis=1)
    elif "neighbors" in m.input_names:
        arrays["neighbors"] = _normal_f32(rng, (n, k, input_size))
    # The targets block by block too (the noise is drawn last, as before): float64 only for a block of rows.
    target = arrays["target"] = np.empty((n, genes), dtype=np.float32)
    for start, stop in row_blocks(n, 8 * max(genes, input_size * max(n_subspots, k)), SYNTH_BLOCK_BYTES):
        signal = np.tanh(2.0 * x[start:stop] @ w_own)
        if "subspot" in arrays:
            signal += 0.5 * np.maximum(arrays["subspot"][start:stop].mean(axis=1) @ w_ctx, 0)
        if "neighbors" in arrays:
            pooled = nb_max[start:stop] if nb_max is not None else arrays["neighbors"][start:stop].max(axis=1)
            signal += 0.5 * np.tanh(pooled @ w_ctx / 2.0)
        target[start:stop] = signal + noise * rng.standard_normal(signal.shape)
    arrays["barcode"] = np.array([f"{own}_{i:06d}" for i in range(n)])
    arrays["genes"] = np.array([f"gene_{j:04d}" for j in range(genes)])
    return arrays


#: Bytes :func:`synth_bundle` draws (in float64) and :func:`cast_features` casts at a time.
SYNTH_BLOCK_BYTES = 32 << 20


class _SynthNeighbors:
    """:func:`synth_bundle`'s neighbours as a :class:`RowSource`: drawn again from a copy of the generator taken where
    they start, a block of rows at a time, in order (the generator's stream is sequential, so the blocks hold the
    numbers one draw of the whole array gives)."""

    dtype = np.dtype(np.float32)

    def __init__(self, rng: np.random.Generator, shape: tuple[int, ...]):
        self.shape = shape
        self._state = rng.bit_generator.state
        self._kind = type(rng.bit_generator)
        self._rng, self._next = None, 0

    def rows(self, start: int, stop: int) -> np.ndarray:
        if start == 0:  # a writer starts over: a fresh copy of the generator
            bits = self._kind()
            bits.state = self._state
            self._rng, self._next = np.random.Generator(bits), 0
        if self._rng is None or start != self._next:
            raise ValueError(f"synthetic neighbours are drawn in order: rows {start}:{stop} after {self._next}")
        self._next = stop
        return self._rng.standard_normal((stop - start, *self.shape[1:])).astype(np.float32)


def _normal_f32(rng: np.random.Generator, shape: tuple[int, ...], add: np.ndarray | None = None) -> np.ndarray:
    """``(add + rng.standard_normal(shape)).astype(float32)``, drawn a block of rows at a time (same values)."""
    out = np.empty(shape, dtype=np.float32)
    for start, stop in row_blocks(shape[0], 8 * math.prod(shape[1:]), SYNTH_BLOCK_BYTES):
        block = rng.standard_normal((stop - start, *shape[1:]))
        out[start:stop] = block if add is None else add[start:stop] + block
    return out


def check_neighbor_index(
    index: np.ndarray, n: int, k: int | None = None, source: str = "bundle", max_bag: int = MAX_BAG
) -> np.ndarray:
    """Check a ``neighbor_index`` array and return it as int64.

    Each row lists positions of the item's neighbours in the same bundle, ``-1`` meaning a zero row. Errors name the
    first offending row.

    Args:
        index: ``(N, K)`` integer array.
        n: Number of items in the bundle.
        k: Expected number of neighbours per item, where the model fixes it.
        source: Where the index came from, for messages.

    Raises:
        InputError: Wrong dtype, rank or row count, a different ``K``, or an index out of range or below -1.
    """
    index = np.asarray(index)
    if index.dtype.kind not in "iu":
        if index.dtype.kind == "f" and index.size:
            bad = ~np.isfinite(index) | (index != np.round(index))
            row = int(np.nonzero(bad.any(axis=-1))[0][0]) if bad.any() else None
            where = f" (row {row} is not integral)" if row is not None else ""
            raise InputError(f"{source}: 'neighbor_index' must be an integer array, got {index.dtype}{where}")
        raise InputError(f"{source}: 'neighbor_index' must be an integer array, got {index.dtype}")
    if index.ndim != 2:
        raise InputError(f"{source}: 'neighbor_index' must have shape (N, K), got {index.shape}")
    if index.shape[0] != n:
        raise InputError(f"{source}: 'neighbor_index' has {index.shape[0]} rows, the bundle has {n} items")
    if k is not None and index.shape[1] != k:
        raise InputError(f"{source}: 'neighbor_index' has K={index.shape[1]} neighbours, the model expects {k}")
    if index.shape[1] == 0:
        raise InputError(f"{source}: 'neighbor_index' has no columns; use -1 for items without neighbours")
    check_bag_size("neighbor_index", index.shape[1], source, max_bag)
    # Row by chunk, so a slide-sized index never needs a second full-size temporary.
    for start in range(0, n, 1 << 16):
        chunk = np.asarray(index[start : start + (1 << 16)])
        for bad, what in ((chunk < -1, "below -1"), (chunk >= n, f"out of range (the bundle has {n} items)")):
            rows = np.nonzero(bad.any(axis=1))[0]
            if rows.size:
                row = start + int(rows[0])
                value = int(np.asarray(index[row])[bad[rows[0]]][0])
                raise InputError(f"{source}: 'neighbor_index' row {row} holds {value}, {what}")
    return index.astype(np.int64, copy=False)


def check_bag_size(name: str, size: int, source: str, max_bag: int = MAX_BAG) -> None:
    """Refuse a bag larger than ``max_bag`` (memory grows with it: Phi runs on every tile of every bag)."""
    at_least(max_bag, option("max_bag"))
    if size > max_bag:
        raise InputError(
            f"{source}: {name!r} has bags of {size} tiles, more than the limit of {max_bag}; "
            f"raise it with {option('max_bag')} if this is intended"
        )


def densify(own: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The per-item neighbour bags of an index: ``neighbors[i, k] = own[index[i, k]]``, zeros where ``-1``."""
    own = own.reshape(own.shape[0], -1)
    padded = np.concatenate([np.zeros((1, own.shape[1]), dtype=own.dtype), own])
    return padded[np.asarray(index) + 1]


def hex_grid(n: int) -> np.ndarray:
    """Centres of ``n`` spots on a hexagonal lattice (Visium's layout) with unit spacing, ``(n, 2)``."""
    cols = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    row, col = i // cols, i % cols
    return np.stack([col + 0.5 * (row % 2), row * np.sqrt(3) / 2], axis=1)


def neighbor_index_radius(coords: np.ndarray, radius: float, max_neighbors: int) -> np.ndarray:
    """Neighbours within ``radius`` (the item itself excluded), nearest first, padded with ``-1``: ``(N, K)``."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(coords).query(coords, k=max_neighbors + 1, distance_upper_bound=radius * (1 + 1e-9))
    dist, idx = dist[:, 1:], idx[:, 1:]  # column 0 is the item itself (distance 0)
    return np.where(np.isfinite(dist), idx, -1).astype(np.int64)


def neighbor_index_knn(coords: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest items of each item, the item itself excluded, nearest first: ``(N, k)``; ``-1`` (a zero row)
    where a slide has fewer than ``k + 1`` items."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(coords).query(coords, k=k + 1)
    dist, idx = dist[:, 1:], idx[:, 1:]  # scipy reports a missing neighbour as distance inf and index N
    return np.where(np.isfinite(dist), idx, -1).astype(np.int64)


def synth_slide(
    family: str,
    n: int,
    input_size: int,
    n_neighbors: int,
    seed: int = 0,
    n_subspots: int = 9,
    genes: int | None = None,
) -> dict[str, np.ndarray]:
    """A seeded whole-slide bundle in the indexed layout, as the slide benchmarks use.

    Spots lie on a hexagonal grid with their (up to 6) adjacent spots as neighbours, padded with ``-1`` at the
    border; cells lie uniformly in a square with their ``n_neighbors`` nearest cells as neighbours. Features are
    standard normal; ``genes`` adds a random target.
    """
    rng = np.random.default_rng(seed)
    if family == "spot":
        coords = hex_grid(n)
        index = neighbor_index_radius(coords, 1.0, n_neighbors)
        arrays = {
            "spot": rng.standard_normal((n, input_size), dtype=np.float32),
            "subspot": rng.standard_normal((n, n_subspots, input_size), dtype=np.float32),
        }
    else:
        coords = rng.uniform(0, np.sqrt(n), size=(n, 2))
        index = neighbor_index_knn(coords, n_neighbors)
        arrays = {"cell": rng.standard_normal((n, input_size), dtype=np.float32)}
    arrays["neighbor_index"] = index
    arrays["x_pixel"], arrays["y_pixel"] = coords[:, 0], coords[:, 1]
    if genes:
        arrays["target"] = rng.standard_normal((n, genes), dtype=np.float32)
    return arrays
