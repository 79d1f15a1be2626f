"""Safe reading of the reference's files: ``final_model.pkl`` pickles, Lightning ``.ckpt`` and ``.pt`` state dicts.

These files are pickles, and a pickle can run any code it names. Here the unpickler resolves only the globals such
files need (see ``MODEL_SPEC.md``, "Reference artifacts"): torch's tensor rebuild helpers and storages, NumPy's array
reconstruction, and a few containers. Every reference class (the LightningModule, its layers, ``AttributeDict``,
the scikit-learn scaler) becomes an inert :class:`Record` that only stores its state. Anything else is refused with
:class:`~deepspot.errors.CheckpointError` naming the global, before it can run. Neither Lightning, scikit-learn nor
the reference package is needed.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError


class Record:
    """An inert stand-in for a class from a reference pickle: it keeps its constructor args and its state."""

    qualname = "Record"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


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


def _safe_getattr(obj: Any, name: str, *default: Any) -> Any:
    # Reference pickles store the bound forward function as getattr(model, "_forward_<context>"). Only that form
    # on a Record is accepted; a real getattr would hand the pickle any attribute of any object it has built.
    if isinstance(obj, Record) and isinstance(name, str) and name.startswith("_forward_"):
        return BoundMethod(obj, name)
    raise CheckpointError(f"refused getattr({type(obj).__name__}, {name!r}) in a pickle")


def _record_class(module: str, name: str) -> type:
    return type(name, (Record,), {"qualname": f"{module}.{name}", "__module__": "deepspot.reference"})


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
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "getattr"): _safe_getattr,
    ("__builtin__", "getattr"): _safe_getattr,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    # Parameters that carry Python attributes (torch >= 1.12 writes them this way when a parameter has any).
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("lightning.fabric.utilities.data", "AttributeDict"): AttributeDict,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): AttributeDict,
    ("lightning.pytorch.utilities.parsing", "AttributeDict"): AttributeDict,
}
for _np_mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_np_mod, "_reconstruct")] = np._core.multiarray._reconstruct
    _ALLOWED[(_np_mod, "scalar")] = np._core.multiarray.scalar
# Arrays pickled with protocol 5 (a scikit-learn scaler pickled on its own, then stored) rebuild from a buffer.
for _np_mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_np_mod, "_frombuffer")] = np._core.numeric._frombuffer
for _np_mod in ("numpy.dtypes",):
    for _dt in ("Float32DType", "Float64DType", "Int64DType", "Int32DType", "ObjectDType", "StrDType", "BoolDType"):
        if hasattr(np.dtypes, _dt):
            _ALLOWED[(_np_mod, _dt)] = getattr(np.dtypes, _dt)
for _dtype in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool"):
    _ALLOWED[("torch", _dtype)] = getattr(torch, _dtype)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in _REFERENCE_MODULES:
            return _record_class(module, name)
        raise CheckpointError(f"refused to load global {module}.{name}: it is not one a DeepSpot file needs")


class _PickleModule:
    """The ``pickle_module`` handed to :func:`torch.load`: torch's zip reader, our restricted globals."""

    Unpickler = _RestrictedUnpickler
    __name__ = "deepspot.reference"

    @staticmethod
    def load(file, **kwargs):  # used by torch for legacy (non-zip) files
        return _RestrictedUnpickler(file, **kwargs).load()


def safe_torch_load(path: str | Path) -> Any:
    """Load a ``torch.save`` file without executing code from it.

    Raises:
        CheckpointError: The file is missing, not a torch file, truncated, or names a global that is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        # torch.load hands .safetensors files to safetensors; ours are deepspot checkpoints and need no import.
        raise CheckpointError(f"{path}: a .safetensors file is not a reference file; deepspot.load reads it directly")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001  any failure to parse the user's file is the file's problem, said in one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({msg})") from None
