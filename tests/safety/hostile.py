"""Generators of hostile files: what an attacker could hand a user as "pretrained weights".

Each function writes one file and returns its path. The tests import this module by file (``hostile`` fixture),
so the TorchScript class below has source code that ``torch.jit.script`` can read.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import torch


class WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` creates (or overwrites) ``marker`` when the archive is loaded."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.mapped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, int]:
        return (self.marker, self.training, self.mapped)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, int]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(self.marker, shared=True, size=8).numel()  # runs inside torch.jit.load


def torchscript_payload(path: Path, marker: Path) -> Path:
    """A ``torch.jit.save`` archive that writes ``marker`` when loaded, under any name (``final_model.pkl``, ...)."""
    torch.jit.save(torch.jit.script(WritesOnLoad(str(marker))), str(path))
    marker.unlink(missing_ok=True)  # scripting ran __getstate__ only, but be sure the marker starts absent
    return path


def _zip_with(path: Path, pickled: bytes, storages: dict[str, bytes] | None = None, compress: bool = False) -> Path:
    """A torch-format zip: ``archive/data.pkl`` and ``archive/data/<key>`` members."""
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def _proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(value: int) -> bytes:
    return b"L" + str(value).encode() + b"L\n"  # LONG: any size


def stride0_array_set(path: Path) -> Path:
    """``frozenset(numpy.ndarray((10**12,), buffer=b"abcd", strides=(0,)))``: a loop over 10**12 items."""
    body = (
        _global("builtins", "frozenset")
        + b"("
        + _global("numpy", "ndarray")
        + b"(("
        + _int(10**12)
        + b"tS'b'\n"
        + b"S'abcd'\n"
        + b"I0\n"
        + b"("
        + b"I0\n"
        + b"ttR"  # ndarray(shape, dtype, buffer, offset, strides)
        + b"tR"
    )
    return _zip_with(path, _proto2(body))


def stride0_tensor_ordered_dict(path: Path) -> Path:
    """``OrderedDict(_rebuild_tensor_v2(storage of 1 float, 0, (10**12,), (0,)))``: a view claiming 10**12 items."""
    pid = b"(S'storage'\n" + _global("torch", "FloatStorage") + b"S'0'\nS'cpu'\nI1\ntQ"
    tensor = _global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"I0\n(" + _int(10**12) + b"t(I0\nt"
    tensor += b"I00\n" + _global("collections", "OrderedDict") + b")RtR"
    body = _global("collections", "OrderedDict") + b"(" + tensor + b"tR"
    return _zip_with(path, _proto2(body), {"0": struct.pack("<f", 1.0)})


def huge_torch_size(path: Path) -> Path:
    """``torch.Size(x)`` with a tensor claiming 10**10 elements over 4 bytes."""
    pid = b"(S'storage'\n" + _global("torch", "FloatStorage") + b"S'0'\nS'cpu'\nI1\ntQ"
    size = _global("torch", "Size") + b"((" + _int(10**10) + b"ttR"
    tensor = _global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"I0\n" + size + b"(I1\nt"
    tensor += b"I00\n" + _global("collections", "OrderedDict") + b")RtR"
    body = b"}(S'state_dict'\n}(S'phi_spot.0.model.0.weight'\n" + tensor + b"ss"
    return _zip_with(path, _proto2(body), {"0": struct.pack("<f", 1.0)})


def storage_larger_than_file(path: Path) -> Path:
    """A persistent id announcing a storage of 10**12 floats in a file of a few hundred bytes."""
    pid = b"(S'storage'\n" + _global("torch", "FloatStorage") + b"S'0'\nS'cpu'\n" + _int(10**12) + b"tQ"
    return _zip_with(path, _proto2(pid), {"0": b""})


def codecs_hex(path: Path) -> Path:
    """``_codecs.encode("00" * n, "hex")``: a codec other than latin1 (hex and zlib codecs expand or decompress)."""
    body = _global("_codecs", "encode") + b"(S'" + b"00" * 64 + b"'\nS'hex_codec'\ntR"
    return _zip_with(path, _proto2(body))


def object_array_of_huge_shape(path: Path) -> Path:
    """``_reconstruct`` then BUILD with shape (10**10,) and one object: numpy allocates the shape before comparing."""
    arr = _global("numpy._core.multiarray", "_reconstruct") + b"(" + _global("numpy", "ndarray") + b"(I0\ntS'b'\ntR"
    dtype = _global("numpy", "dtype") + b"(S'O8'\nI00\nI01\ntR(I3\nS'|'\nNNNI-1\nI-1\nI63\ntb"
    state = b"(I1\n(" + _int(10**10) + b"t" + dtype + b"I00\n(lp0\nI1\natb"
    return _zip_with(path, _proto2(arr + state))


def zip_bomb(path: Path, megabytes: int = 1024) -> Path:
    """A 1 MB zip whose ``data.pkl`` inflates to ``megabytes`` MB of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(megabytes):
                member.write(chunk)
    return path


def tar_with_symlink(path: Path, target: Path) -> Path:
    """A torch < 0.4 tar file whose ``pickle`` member is a symbolic link to ``target`` (a FIFO would block)."""
    with tarfile.open(path, "w") as tar:
        link = tarfile.TarInfo("pickle")
        link.type = tarfile.SYMTYPE
        link.linkname = str(target)
        tar.addfile(link)
        for name in ("storages", "tensors"):
            info = tarfile.TarInfo(name)
            data = pickle.dumps(0, protocol=2)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def deep_nesting(path: Path, depth: int = 100_000) -> Path:
    """A list nested ``depth`` levels deep."""
    return _zip_with(path, _proto2(b"(" * depth + b"l" * depth))


def reference_with_hparams(path: Path, source: Path, **hparams) -> Path:
    """A copy of a reference ``.ckpt`` whose hyperparameters say ``hparams`` (``input_size=10**9``, ...)."""
    from deepspot.reference import safe_torch_load

    ckpt = safe_torch_load(source)
    state_dict = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    kept = {k: v for k, v in dict(ckpt["hyper_parameters"]).items() if k != "scaler"}
    torch.save({"state_dict": state_dict, "hyper_parameters": {**kept, **hparams}}, path)
    return path
