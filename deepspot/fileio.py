"""Atomic file writing: a temporary file beside the target, then a rename, so no half-written file is left."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DeepSpotError


def check_clobber(path: str | Path, no_clobber: bool) -> None:
    """With ``no_clobber``, refuse an output that exists (before any work is done)."""
    if no_clobber and os.path.lexists(path):
        raise DeepSpotError(f"{path}: already exists, and --no-clobber forbids replacing it")


def ensure_free_space(folder: str | Path, nbytes: int, what: str) -> None:
    """Refuse up front to write ``nbytes`` into ``folder`` when its file system has less free space than that."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # not measurable here (some network file systems): the write itself will say
    if nbytes > free:
        raise DeepSpotError(
            f"{folder}: not enough free space for {what}: needs {nbytes / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free"
        )


def preallocate(path: str | Path) -> None:
    """Reserve the blocks of a (sparse) file now, so that writing it through a memory map cannot hit a full disk.

    A full disk met through a memory map is SIGBUS, which kills the process and leaves its temporary files; met
    here it is ``OSError(ENOSPC)``, one line, and the caller's clean-up runs.
    """
    size = os.path.getsize(path)
    if size and hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without fallocate
                raise
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None, no_clobber: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``, on failure delete it.

    The temporary name keeps ``path``'s suffix (libraries such as NumPy add one otherwise). With ``no_clobber`` the
    finished file takes its name with a hard link, which fails if ``path`` has come to exist meanwhile.

    Raises:
        DeepSpotError: The output folder does not exist or is not writable, or ``path`` exists and ``no_clobber``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DeepSpotError(f"{path}: output folder {folder} does not exist")
    check_clobber(path, no_clobber)
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
        if no_clobber:
            try:
                os.link(tmp_path, path)
            except FileExistsError:
                raise DeepSpotError(f"{path}: already exists, and --no-clobber forbids replacing it") from None
            tmp_path.unlink()
        else:
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
