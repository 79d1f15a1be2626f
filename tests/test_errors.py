"""An error names the option to change as the caller wrote it: the Python argument from Python, the flag from the CLI."""

from __future__ import annotations

import threading

from deepspot.errors import advice, command_line, from_command_line, option, option_value


def test_python_callers_read_their_arguments():
    assert not from_command_line()
    assert option("batch_size") == "batch_size"
    assert option("n_random", "--random") == "n_random"
    assert option_value("layout", "indexed") == "layout='indexed'"
    assert option_value("validate", False, "--no-validate") == "validate=False"
    assert advice("deepspot.layout.write_bundle(..., index=True)", "deepspot bundle --index").startswith("deepspot.layout")


def test_the_command_line_reads_its_flags():
    with command_line():
        assert from_command_line()
        assert option("batch_size") == "--batch-size"
        assert option("n_random", "--random") == "--random"
        assert option_value("layout", "indexed") == "--layout indexed"
        assert option_value("io_dtype", "fp16", "--io") == "--io fp16"
        assert option_value("validate", False, "--no-validate") == "--no-validate"  # a switch is its flag alone
        assert option_value("no_clobber", True) == "--no-clobber"
        assert advice("deepspot.layout.write_bundle(..., index=True)", "deepspot bundle --index") == (
            "deepspot bundle --index"
        )
        with command_line(False):  # a cohort's worker started from Python
            assert option("batch_size") == "batch_size"
        assert option("batch_size") == "--batch-size"
    assert option("batch_size") == "batch_size"  # reset on the way out


def test_the_setting_is_the_current_context_s_not_the_process_s():
    seen = []
    with command_line():
        thread = threading.Thread(target=lambda: seen.append(option("batch_size")))  # a new thread: a fresh context
        thread.start()
        thread.join()
    assert seen == ["batch_size"]
