"""Safe reading of the reference's files: ``final_model.pkl`` pickles, Lightning ``.ckpt`` and ``.pt`` state dicts.

These files are pickles, and a pickle can run any code it names. They are never handed to :func:`torch.load` or
:func:`torch.jit.load`: this module reads torch's zip format (and the older single-pickle format) itself.

- The unpickler resolves only the globals such files need (see ``MODEL_SPEC.md``, "Reference artifacts"), and
  each of them is a wrapper that checks its arguments before it builds anything: tensors are views of storages that
  the file really holds, arrays match the bytes they are built from, containers are built only from what the pickle
  itself spelled out. Every reference class (the LightningModule, its layers, the scikit-learn scaler) becomes an
  inert :class:`Record` that only stores its state. Anything else is refused with
  :class:`~deepspot.errors.CheckpointError` naming the global, before it can run.
- TorchScript archives (``torch.jit.save``; their code runs when they are loaded) are refused by name, and so are
  the tar files of torch < 0.4 and zip members that are compressed (torch never writes those: a zip bomb would).
- Every size is checked against the file before anything is allocated, so a small file cannot ask for gigabytes
  nor for a loop over a huge length; the pickle runs on the pure-Python unpickler, which Ctrl-C can interrupt.

Neither Lightning, scikit-learn nor the reference package is needed.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

#: At most this many dimensions in a tensor or an array of a reference file.
MAX_NDIM = 16
#: The legacy (non-zip) format's magic number and protocol version (``torch/serialization.py``).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class Record:
    """An inert stand-in for a class from a reference pickle: it keeps its constructor args and its state."""

    qualname = "Record"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            first = state[0] if isinstance(state[0], dict) else {}
            state = {**first, **state[1]}
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<{type(self).qualname}>"


class AttributeDict(dict):
    """Stand-in for Lightning's ``AttributeDict`` (a dict with attribute access)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class BoundMethod:
    """Stand-in for ``getattr(model, "_forward_<context>")``: records the name, calls nothing."""

    def __init__(self, obj: Any, name: str):
        self.obj = obj
        self.name = name


class _Refused(Exception):
    """A refusal inside the unpickler; the reader adds the file's name."""


def _refuse(message: str):
    raise _Refused(message)


# -- the globals a reference file may name, each checking its arguments --------------------------------------------
def _safe_getattr(obj: Any, name: str, *default: Any) -> Any:
    # Reference pickles store the bound forward function as getattr(model, "_forward_<context>"). Only that form
    # on a Record is accepted; a real getattr would hand the pickle any attribute of any object it has built.
    if isinstance(obj, Record) and isinstance(name, str) and name.startswith("_forward_"):
        return BoundMethod(obj, name)
    _refuse(f"refused getattr({type(obj).__name__}, {name!r}) in a pickle")


def _record_class(module: str, name: str) -> type:
    return type(name, (Record,), {"qualname": f"{module}.{name}", "__module__": "deepspot.reference"})


def _spelled_out(value: Any, what: str) -> list | tuple:
    # Containers are built only from lists and tuples the pickle spelled out item by item, whose length is bounded
    # by the file's size (never from an array or another object that could claim any length).
    if not isinstance(value, (list, tuple)):
        _refuse(f"refused {what} built from a {type(value).__name__}")
    return value


def _set(items: Any = ()) -> set:
    return set(_spelled_out(items, "a set"))


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_spelled_out(items, "a frozenset"))


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    pairs = _spelled_out(items, "an OrderedDict")
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        _refuse("refused an OrderedDict built from something other than pairs")
    return collections.OrderedDict(pairs)


def _codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles write bytes as _codecs.encode(str, "latin1"); no other codec (some decompress or decode).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _refuse(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM:
        _refuse(f"refused {what}: not a tuple of at most {MAX_NDIM} sizes")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        _refuse(f"refused {what}: sizes must be non-negative integers")
    return tuple(value)


def _torch_size(sizes: Any = ()) -> torch.Size:
    return torch.Size(_shape(sizes, "a torch.Size"))


def _torch_device(kind: Any, index: Any = None) -> torch.device:
    if not isinstance(kind, str) or (index is not None and not isinstance(index, int)) or len(kind) > 64:
        _refuse("refused a torch.device that is not a name and an index")
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except RuntimeError:
        _refuse(f"refused an unknown torch.device {kind!r}")


class _StorageType:
    """``torch.FloatStorage`` and its kin, as named in a persistent id: only their dtype is used."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def __call__(self, *args: Any, **kwargs: Any):
        _refuse(f"refused to call torch.{self.name}")


_STORAGE_TYPES = {
    f"{name}Storage": _StorageType(f"{name}Storage", dtype)
    for name, dtype in {
        "Float": torch.float32,
        "Double": torch.float64,
        "Half": torch.float16,
        "BFloat16": torch.bfloat16,
        "Long": torch.int64,
        "Int": torch.int32,
        "Short": torch.int16,
        "Char": torch.int8,
        "Byte": torch.uint8,
        "Bool": torch.bool,
    }.items()
}


class _Storage:
    """A storage the file holds: a flat tensor of ``numel`` elements."""

    def __init__(self, data: torch.Tensor):
        self.data = data


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    # torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, ...).
    # The view must lie inside the storage and hold no more elements than it (no stride-0 blow-up), and the result
    # owns its memory.
    if not isinstance(storage, _Storage):
        _refuse("refused a tensor whose storage is not one the file holds")
    size = _shape(size, "a tensor's size")
    stride = _shape(stride, "a tensor's stride")
    if len(stride) != len(size) or not isinstance(offset, int) or offset < 0:
        _refuse("refused a tensor with inconsistent size, stride or offset")
    flat = storage.data
    numel = math.prod(size)
    if numel == 0:
        return torch.empty(size, dtype=flat.dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > flat.numel() or numel > flat.numel():
        _refuse(f"refused a tensor of size {size} over a storage of {flat.numel()} elements")
    return flat.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, *state: Any):
    # torch._utils._rebuild_parameter(_with_state): a parameter is its tensor here; hooks and Python state (which a
    # real rebuild would set as attributes) are dropped.
    if not isinstance(data, torch.Tensor):
        _refuse(f"refused a parameter made of a {type(data).__name__}")
    return data


class _NDArrayType:
    """``numpy.ndarray`` as a pickle names it: only :func:`_np_reconstruct` accepts it; it cannot be called."""

    def __call__(self, *args: Any, **kwargs: Any):
        _refuse("refused to call numpy.ndarray directly")


_NDARRAY = _NDArrayType()
#: Fixed-size dtypes an array of a reference file may have (a scaler's arrays, a loss history) and object arrays.
_DTYPE_KINDS = "biufcO"


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str) or len(spec) > 8:
        _refuse("refused a numpy dtype that is not a short type code")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        _refuse(f"refused an unknown numpy dtype {spec!r}")
    if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        _refuse(f"refused a numpy dtype {spec!r}: only numbers, booleans and objects")
    return dtype


def _np_reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy's _reconstruct(ndarray, (0,), b"b") makes an empty array that BUILD then fills; the shape it is given
    # is ignored (it could ask for any size), the real one is checked in _build_array.
    if cls is not _NDARRAY:
        _refuse("refused numpy _reconstruct of something other than an ndarray")
    return np.ndarray((0,), np.uint8)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or dtype.kind == "O":
        _refuse("refused a numpy scalar of an unexpected dtype")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        _refuse("refused a numpy scalar whose bytes do not match its dtype")
    return np.frombuffer(data, dtype=dtype)[0]


def _np_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = bytes(buffer.raw())
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.kind == "O":
        _refuse("refused numpy _frombuffer of something other than bytes")
    shape = _shape(shape, "an array's shape")
    if math.prod(shape) * dtype.itemsize != len(buffer) or order not in ("C", "F"):
        _refuse(f"refused an array of shape {shape} over {len(buffer)} bytes")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order).copy()


def _no_argument_dtype(dtype: np.dtype):
    def make(*args: Any) -> np.dtype:
        if args:
            _refuse(f"refused numpy.dtypes.{type(dtype).__name__} with arguments")
        return dtype

    return make


_REFERENCE_MODULES = (
    "deepspot.spot.model",
    "deepspot.cell.model",
    "deepspot.spot.loss",
    "deepspot.cell.loss",
    "deepspot.model",
    "deepspot.loss",
    "torch.nn.modules.container",
    "torch.nn.modules.linear",
    "torch.nn.modules.dropout",
    "torch.nn.modules.activation",
    "sklearn.preprocessing._data",
    "sklearn.preprocessing.data",
)

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("__builtin__", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("__builtin__", "frozenset"): _frozenset,
    ("builtins", "getattr"): _safe_getattr,
    ("__builtin__", "getattr"): _safe_getattr,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # Parameters that carry Python attributes (torch >= 1.12 writes them this way when a parameter has any).
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _np_dtype,
    ("lightning.fabric.utilities.data", "AttributeDict"): AttributeDict,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): AttributeDict,
    ("lightning.pytorch.utilities.parsing", "AttributeDict"): AttributeDict,
}
for _np_mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_np_mod, "_reconstruct")] = _np_reconstruct
    _ALLOWED[(_np_mod, "scalar")] = _np_scalar
# Arrays pickled with protocol 5 (a scikit-learn scaler pickled on its own, then stored) rebuild from a buffer.
for _np_mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_np_mod, "_frombuffer")] = _np_frombuffer
for _code, _dt in {"f4": "Float32DType", "f8": "Float64DType", "i8": "Int64DType", "i4": "Int32DType"}.items():
    _ALLOWED[("numpy.dtypes", _dt)] = _no_argument_dtype(np.dtype(_code))
_ALLOWED[("numpy.dtypes", "BoolDType")] = _no_argument_dtype(np.dtype(bool))
_ALLOWED[("numpy.dtypes", "ObjectDType")] = _no_argument_dtype(np.dtype(object))
for _dtype in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool"):
    _ALLOWED[("torch", _dtype)] = getattr(torch, _dtype)
for _name, _storage_type in _STORAGE_TYPES.items():
    _ALLOWED[("torch", _name)] = _storage_type


def _build_array(array: np.ndarray, state: Any) -> None:
    # numpy's __setstate__((version, shape, dtype, is_fortran, data)) allocates the shape before it compares it with
    # the data for object arrays: compare first.
    if not (isinstance(state, tuple) and len(state) in (4, 5)):
        _refuse("refused an array with a malformed state")
    shape, dtype, data = _shape(state[-4], "an array's shape"), state[-3], state[-1]
    if not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS:
        _refuse("refused an array of an unexpected dtype")
    count = math.prod(shape)
    if dtype.kind == "O":
        if not isinstance(data, list) or len(data) != count:
            _refuse(f"refused an object array of shape {shape} over {type(data).__name__} data")
    elif not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
        _refuse(f"refused an array of shape {shape} whose data has another size")
    array.__setstate__(state)


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: BUILD can be checked, Ctrl-C works
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storage: Any = None):
        super().__init__(file, encoding="latin1")
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in _REFERENCE_MODULES:
            return _record_class(module, name)
        _refuse(f"refused to load global {module}.{name}: it is not one a DeepSpot file needs")

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None:
            _refuse("refused a persistent id outside a torch file")
        return self._storage(pid)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Record):
            inst.__setstate__(state)
        elif isinstance(inst, np.ndarray):
            _build_array(inst, state)
        elif isinstance(inst, collections.OrderedDict) and isinstance(state, (dict, type(None))):
            pass  # a state dict's ``_metadata`` (per-module versions): not needed, never set as attributes
        elif isinstance(inst, np.dtype):
            # np.dtype's state: (version, byteorder, subarray, names, fields, elsize, alignment, flags); only the
            # byte order of a plain dtype may be set, never its size or fields.
            if not (isinstance(state, tuple) and len(state) >= 8 and state[2:5] == (None, None, None)):
                _refuse("refused a numpy dtype with a malformed state")
            if state[5] not in (-1, inst.itemsize) or state[1] not in ("<", ">", "=", "|"):
                _refuse("refused a numpy dtype whose state changes its size")
            self.stack[-1] = inst.newbyteorder(state[1]) if state[1] in "<>" else inst
        else:
            _refuse(f"refused to set the state of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def _unpickle(data: bytes | io.BufferedIOBase, storage: Any = None) -> Any:
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return _RestrictedUnpickler(stream, storage).load()


# -- torch's file formats ------------------------------------------------------------------------------------------
def _storage_loader(read: Any, limit: int):
    """A ``persistent_load`` for torch's pickles; ``read(key, dtype, numel)`` returns the storage as a flat tensor."""
    cache: dict[str, _Storage] = {}

    def load(pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            _refuse("refused a persistent id that is not a storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or len(key) > 64:
            _refuse("refused a storage of an unknown type")
        if not isinstance(numel, int) or numel < 0 or numel * storage_type.dtype.itemsize > limit:
            _refuse(f"refused a storage of {numel} elements in a file of {limit} bytes")
        if key not in cache:
            cache[key] = _Storage(read(key, storage_type.dtype, numel))
        storage = cache[key]
        if storage.data.dtype != storage_type.dtype or storage.data.numel() != numel:
            _refuse(f"refused storage {key}: named with two types or sizes")
        return storage

    return load


def _flat(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _read_zip(path: Path, size: int) -> Any:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        names = {info.filename: info for info in infos}
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _Refused("not a torch file: a zip without exactly one <archive>/data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
            raise _Refused(
                "is a TorchScript archive (torch.jit.save); loading one runs the code inside it, so deepspot never "
                "does: save the model's state_dict (torch.save(model.state_dict(), ...)) and import that"
            )
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                raise _Refused(f"member {info.filename} is compressed or larger than the file; torch writes neither")
        order = "little"
        if f"{prefix}byteorder" in names:
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace")
        if order != "little":
            raise _Refused(f"holds {order[:16]}-endian tensors; only little-endian files are read")

        def read(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            info = names.get(f"{prefix}data/{key}")
            if info is None or info.file_size != numel * dtype.itemsize:
                _refuse(f"storage {key} is missing or does not hold {numel} elements of {dtype}")
            return _flat(archive.read(info), dtype)

        return _unpickle(archive.read(names[pickles[0]]), _storage_loader(read, size))


def _read_legacy(path: Path, size: int) -> Any:
    # torch < 1.6 (or _use_new_zipfile_serialization=False): magic number, protocol, system info, the object, the
    # storage keys, then each storage as an 8-byte element count and its bytes, in the order of the keys. The object
    # is read twice: first over shapeless placeholders (meta tensors: no memory) to learn and check the storages it
    # uses, then, once their bytes are read, for real.
    legacy = "refused a persistent id that is not a whole storage"
    with open(path, "rb") as f:
        if _unpickle(f) != _LEGACY_MAGIC:
            raise _Refused("not a torch file (no torch magic number)")
        if _unpickle(f) != _LEGACY_PROTOCOL:
            raise _Refused("written by an unsupported torch serialisation protocol")
        info = _unpickle(f)
        if not isinstance(info, dict) or not info.get("little_endian", True):
            raise _Refused("holds big-endian tensors or no system information; only little-endian files are read")
        start = f.tell()
        wanted: dict[str, tuple[torch.dtype, int]] = {}

        def placeholder(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            wanted[key] = (dtype, numel)
            return torch.empty(numel, dtype=dtype, device="meta")

        def whole(load):
            def check(pid: Any) -> _Storage:
                if not (isinstance(pid, tuple) and len(pid) == 6 and pid[5] is None):
                    _refuse(legacy)
                return load(pid)

            return check

        _unpickle(f, whole(_storage_loader(placeholder, size)))
        keys = _unpickle(f)
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(wanted) or len(keys) != len(wanted):
            raise _Refused("its storage keys do not match the storages it uses")
        data: dict[str, torch.Tensor] = {}
        for key in keys:
            dtype, numel = wanted[key]
            head = f.read(8)
            count = struct.unpack("<q", head)[0] if len(head) == 8 else -1
            raw = f.read(numel * dtype.itemsize) if count == numel else b""
            if count != numel or len(raw) != numel * dtype.itemsize:
                raise _Refused(f"storage {key} is truncated or holds another size than announced")
            data[key] = _flat(raw, dtype)
        f.seek(start)
        return _unpickle(f, whole(_storage_loader(lambda key, dtype, numel: data[key], size)))


def _is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def safe_torch_load(path: str | Path) -> Any:
    """Read a ``torch.save`` file without executing code from it.

    Raises:
        CheckpointError: The file is missing, not a torch file, truncated, a TorchScript archive, asks for more than
            it holds, or names a global that is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        raise CheckpointError(f"{path}: a .safetensors file is not a reference file; deepspot.load reads it directly")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        if head.startswith(b"PK\x03\x04"):
            return _read_zip(path, size)
        if _is_tar(head):
            raise _Refused("is a tar archive of torch < 0.4; that format is not read (save it again with torch.save)")
        return _read_legacy(path, size)
    except _Refused as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a readable torch file (nested too deeply)") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable torch file (it asks for more memory than there is)") from None
    except Exception as e:  # noqa: BLE001  any failure to parse the user's file is the file's problem, said in one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({msg})") from None
