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
        fd, tmp = tempfile.mkstemp(prefix=f"{temp_prefix(path.name)}", suffix=".tmp" + (suffix or path.suffix), dir=folder)
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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex, read 1 MiB at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- temporary files and what a killed process leaves ---------------------------------------------------------------
def temp_prefix(name: str) -> str:
    """The prefix of deepspot's hidden temporary files: ``.<name>.pid<N>.``, so that a later run can tell the files
    of a process that died (SIGKILL runs no clean-up) from those of one still writing."""
    return f".{name}.pid{os.getpid()}."


def leftover_pid(name: str) -> int | None:
    """The process id in the name of one of deepspot's temporary files, else ``None``."""
    if not name.startswith(".") or ".pid" not in name:
        return None
    digits = name.split(".pid", 1)[1].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporary files that deepspot processes which died left in ``folder`` (only those whose process is
    gone: a run still writing beside this one keeps its files). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.pid*"):
        pid = leftover_pid(path.name)
        if pid is not None and pid != os.getpid() and not _alive(pid) and path.is_file():
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
