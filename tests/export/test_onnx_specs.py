"""The export spec registry covers every mode, and each spec describes its graph consistently."""

from __future__ import annotations

import pytest
import torch

from deepspot.errors import ConfigError
from deepspot.export import EXPORT_SPECS, PRECISIONS, get_spec
from deepspot.export.specs import resolve_io_dtype
from deepspot.modes import MODES


def test_every_mode_has_a_spec():
    missing = [m.key for m in MODES if m.key not in EXPORT_SPECS]
    assert not missing, f"modes without an export spec: {missing}"
    assert set(EXPORT_SPECS) == {m.key for m in MODES}


@pytest.mark.parametrize("key", sorted(EXPORT_SPECS))
def test_spec_names_axes_and_examples(key):
    spec = EXPORT_SPECS[key]
    assert spec.input_names == spec.mode.input_names
    assert spec.output_names == ("expression",)
    axes = spec.dynamic_axes()
    assert axes["expression"] == {0: "batch"}
    shapes = spec.input_shapes(16)
    examples = spec.example_inputs(16, batch=3, bag_size=4)
    assert list(examples) == list(spec.input_names)
    for bag in spec.mode.bags:
        assert axes[bag.name][0] == "batch"
        assert 2 not in axes[bag.name]  # the feature axis is fixed
        if bag.single:
            assert 1 not in axes[bag.name] and shapes[bag.name] == ("batch", 1, 16)
            assert examples[bag.name].shape == (3, 1, 16)
        else:
            assert axes[bag.name][1] == f"n_{bag.name}" and shapes[bag.name] == ("batch", f"n_{bag.name}", 16)
            assert examples[bag.name].shape == (3, 4, 16)
            assert torch.all(examples[bag.name][0, -1] == 0)  # a zero-padding row, as the reference's loaders make
    for precision in PRECISIONS:
        assert spec.tolerance(precision).rel > 0
    assert spec.tolerance("fp32").rel == 1e-5
    assert len({case for case in spec.validation_cases}) >= 2
    assert spec.trace_case not in spec.validation_cases


def test_examples_are_seeded_and_leave_the_global_generator_alone():
    spec = get_spec("spot", "subspot_neighbors")
    state = torch.random.get_rng_state()
    a = spec.example_inputs(8, seed=3)
    b = spec.example_inputs(8, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(state, torch.random.get_rng_state())


def test_get_spec_accepts_reference_names_and_refuses_unknown_modes():
    assert get_spec("spot", "spot_subspot_neighbors") is get_spec("spot", "subspot_neighbors")
    with pytest.raises(ConfigError, match="unknown spot mode"):
        get_spec("spot", "cells")
    with pytest.raises(ConfigError, match="unknown family"):
        get_spec("tissue", "spot")


def test_io_dtype_rules():
    assert resolve_io_dtype("fp32", None) == "fp32"
    assert resolve_io_dtype("fp16", "fp16") == "fp16"
    assert resolve_io_dtype("fp16", None) == "fp32"
    with pytest.raises(ConfigError, match="^io_dtype='fp16' needs precision='fp16' \\(got precision='fp32'\\)$"):
        resolve_io_dtype("fp32", "fp16")
    with pytest.raises(ConfigError, match="unknown io dtype"):
        resolve_io_dtype("fp32", "int8")
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve_io_dtype("fp8", None)
