"""What every test of a user's mistake checks: exit code 2 and one line, ``Error: ...``, with no traceback."""

from __future__ import annotations


def error_line(result, *needles: str) -> str:
    """The one line a CLI run (a ``CliRunner`` result) printed for a user's mistake, after checking there is only
    that line, that it starts with ``Error: `` and holds every needle, and that the exit code is 2."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
