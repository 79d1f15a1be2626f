"""Loading a reference file never runs code from it: crafted pickles are refused, naming the global."""

from __future__ import annotations

import collections
import importlib
import os
import pickle

import pytest
import torch

import deepspot
from deepspot.errors import CheckpointError
from deepspot.importer import import_reference


class WritesAFile:
    """A payload that, unpickled by a plain unpickler, would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsAShell:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class GetsAnAttribute:
    """``getattr(OrderedDict(), "fromkeys")``: the bound-method form the reference uses, on something else."""

    def __reduce__(self):
        return (getattr, (collections.OrderedDict(), "fromkeys"))


def test_plain_pickle_running_a_shell_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "final_model.pkl"
    evil.write_bytes(pickle.dumps(RunsAShell(marker), protocol=2))  # a plain pickle, not torch's zip format
    with pytest.raises(CheckpointError, match=r"final_model\.pkl: refused to load global (posix|nt)\.system"):
        import_reference(evil)
    assert not marker.exists()


def test_torch_zip_opening_a_file_is_refused(tmp_path):
    marker = tmp_path / "created_by_pickle.txt"
    evil = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"phi_spot.0.model.0.weight": torch.zeros(1)}, "x": WritesAFile(marker)}, evil)
    for load in (import_reference, deepspot.load):
        with pytest.raises(CheckpointError, match=r"model\.ckpt: refused to load global (_?io|builtins)\.open"):
            load(evil)
    assert not marker.exists()


def test_hand_written_pickle_calling_eval_is_refused(tmp_path):
    marker = tmp_path / "from_eval"
    # GLOBAL builtins.eval, MARK, STRING, TUPLE, REDUCE, STOP: eval("open(marker, 'w')") under a plain unpickler.
    payload = f"cbuiltins\neval\n(S'open({str(marker)!r}, \"w\")'\ntR.".encode()
    evil = tmp_path / "weights.pt"
    evil.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"weights\.pt: refused to load global builtins\.eval"):
        import_reference(evil)
    assert not marker.exists()


def test_getattr_on_anything_but_a_model_is_refused(tmp_path):
    evil = tmp_path / "model.pt"
    torch.save({"a": GetsAnAttribute()}, evil)
    with pytest.raises(CheckpointError, match=r"model\.pt: refused getattr\(OrderedDict, 'fromkeys'\)"):
        import_reference(evil)


def test_truncated_and_foreign_files(reference_dir, tmp_path):
    whole = (reference_dir / "spot_subspot_neighbors.pkl").read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pkl: not a readable torch file"):
        import_reference(cut)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: not a readable torch file"):
        import_reference(empty)
    text = tmp_path / "notes.pt"
    text.write_text("not a pickle at all\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable torch file"):
        import_reference(text)
    with pytest.raises(CheckpointError, match=r"absent\.pkl: no such file"):
        import_reference(tmp_path / "absent.pkl")


class Foo(torch.nn.Module):
    """A model class under the reference's module path that the importer does not know."""


def test_unknown_model_class_is_refused(tmp_path, monkeypatch):
    # Pickle an instance as deepspot.spot.model.Foo: pickle looks the class up there, so put it there meanwhile.
    module = importlib.import_module("deepspot.spot.model")
    monkeypatch.setattr(Foo, "__module__", "deepspot.spot.model")
    monkeypatch.setattr(module, "Foo", Foo, raising=False)
    path = tmp_path / "final_model.pkl"
    torch.save(Foo(), path)
    monkeypatch.undo()
    unknown = r"final_model\.pkl: holds an unknown model class deepspot\.spot\.model\.Foo"
    with pytest.raises(CheckpointError, match=unknown):
        import_reference(path)


def test_a_layer_is_not_a_model(tmp_path):
    from deepspot.layers import Phi

    path = tmp_path / "phi.pkl"
    torch.save(Phi(3, 2, 0.1), path)  # our Phi lives in deepspot.layers, which no reference file names
    with pytest.raises(CheckpointError, match=r"phi\.pkl: refused to load global deepspot\.layers\.Phi"):
        import_reference(path)


def test_malformed_hyperparameter_and_gene_files_are_one_line(tmp_path):
    from deepspot.importer import load_hparams, read_genes

    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"deep.yaml: not a readable YAML file \(nested too deeply\)"):
        load_hparams(deep)
    short = tmp_path / "genes.csv"
    short.write_text("gene_name,isPredicted\nTP53\nEGFR,True\n")
    with pytest.raises(CheckpointError, match=r"genes.csv: line 2 has fewer fields than the header"):
        read_genes(short)
    # the line in the file, not the row's number: a blank line and a quoted line break come before it
    short.write_text('gene_name,isPredicted\n\nTP53,True\n"EG\nFR",True\nKRAS\n')
    with pytest.raises(CheckpointError, match=r"genes.csv: line 6 has fewer fields than the header"):
        read_genes(short)
    for name in ("binary.csv", "binary.txt"):
        (tmp_path / name).write_bytes(b"gene_name\n\xff\xfe\n")
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable gene list"):
            read_genes(tmp_path / name)
