"""Atomic file writing: a temporary file beside the target, then a rename, so no half-written file is left."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DeepSpotError


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``, on failure delete it.

    The temporary name keeps ``path``'s suffix (libraries such as NumPy add one otherwise).

    Raises:
        DeepSpotError: The output folder does not exist or is not writable.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DeepSpotError(f"{path}: output folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + (suffix or path.suffix), dir=folder)
    except OSError as e:
        raise DeepSpotError(f"{path}: cannot write here ({e.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600), and writers may replace it: give the result the permissions of
        # any new file just before it takes its name.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def check_output_folder(path: str | Path, what: str = "output") -> Path:
    """Refuse, before any work, an output whose folder does not exist or is not writable.

    One rule for every command: deepspot creates its output (a file, or the folder ``train`` and ``quickstart`` write
    into) but never missing parent folders, so a typo in a path fails at once instead of after the work.

    Raises:
        DeepSpotError: The folder is missing or not writable, or ``path`` names an existing directory.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DeepSpotError(f"{path}: {what} folder {folder} does not exist (deepspot does not create parent folders)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DeepSpotError(f"{path}: {what} folder {folder} is not writable")
    return path


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """:func:`check_output_folder`, and ``path`` must not be an existing directory."""
    path = check_output_folder(path, what)
    if path.is_dir():
        raise DeepSpotError(f"{path}: is a directory; give a file name")
    return path
