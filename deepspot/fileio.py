"""Atomic file writing: a temporary file beside the target, then a rename, so no half-written file is left."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DeepSpotError, InputError, option_value


def short_write(e: OSError) -> str:
    """What NumPy's short write (``OSError("2880000 requested and 203744 written")``, no errno) means, in words."""
    return f"the write stopped short ({e}): the disk is full or a file size limit (ulimit -f) was reached"


def is_short_write(e: OSError) -> bool:
    text = str(e)
    return e.errno is None and "requested and" in text and "written" in text


def check_clobber(path: str | Path, no_clobber: bool) -> None:
    """With ``no_clobber``, refuse an output that exists (before any work is done)."""
    if no_clobber and os.path.lexists(path):
        raise _exists(path)


def _exists(path: str | Path) -> DeepSpotError:
    """The error for an output that exists where ``no_clobber`` forbids replacing it."""
    return DeepSpotError(f"{path}: already exists, and {option_value('no_clobber', True)} forbids replacing it")


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
def temporary_file(folder: str | Path, prefix: str, suffix: str, output: str | Path | None = None) -> Iterator[Path]:
    """A new empty file in ``folder`` (private, 0600), removed on the way out unless it has been renamed away.

    Its removal is armed before the file exists: with ``mkstemp``, a Ctrl-C or SIGTERM (which raise in the main
    thread) landing after the file was made and before the code that removes it would leave it behind. The name has
    64 random bits, so it is made with ``O_EXCL`` at the first try; one that exists is an error, never removed.

    Raises:
        DeepSpotError: The file cannot be made there (named as ``output``'s, if given).
        OSError: The same, without ``output``.
    """
    path = Path(folder) / f"{prefix}{secrets.token_hex(8)}{suffix}"
    theirs = False
    try:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
        except FileExistsError:
            theirs = True
            raise
        except OSError as e:
            if output is None:
                raise
            raise DeepSpotError(f"{output}: cannot write here ({e.strerror})") from None
        yield path
    finally:
        if not theirs:
            with contextlib.suppress(OSError):
                path.unlink()


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
    # Removed on the way out, whatever happens, unless it has taken its name.
    with temporary_file(folder, temp_prefix(path.name), ".tmp" + (suffix or path.suffix), output=path) as tmp_path:
        yield tmp_path
        # The temporary file is private (0600), and writers may replace it: give the result the permissions of
        # any new file just before it takes its name.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        if no_clobber:
            try:
                os.link(tmp_path, path)
            except FileExistsError:
                raise _exists(path) from None
            tmp_path.unlink()
        else:
            os.replace(tmp_path, path)


def temporary_folder(final: str | Path) -> Path:
    """A hidden folder beside ``final`` to write into and then rename onto it, with the permissions of any new folder
    (``mkdtemp`` makes it private, 0700: a Triton server or a colleague on a shared cluster could not read it)."""
    final = Path(final)
    parent = final.parent if str(final.parent) else Path(".")
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    return folder


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


def check_output_file(
    path: str | Path, what: str = "output", inputs: Iterable[object] = (), suffix: str | None = None
) -> Path:
    """:func:`check_output_folder`, ``path`` must not be an existing directory, nor one of ``inputs``
    (:func:`refuse_inputs`), and with ``suffix`` it must end in it (a report given a checkpoint's name by mistake
    would replace the checkpoint)."""
    path = check_output_folder(path, what)
    if path.is_dir():
        raise DeepSpotError(f"{path}: is a directory; give a file name")
    if suffix is not None and path.suffix.lower() != suffix:
        raise DeepSpotError(f"{path}: {what} writes a {suffix} file; give a name ending in {suffix}")
    refuse_inputs(path, inputs, what)
    return path


def refuse_inputs(output: str | Path, inputs: Iterable[object], what: str = "output") -> None:
    """Refuse an output that is one of the run's ``inputs`` (the same file, also through a link, or a file inside an
    input folder), before any work: writing it would destroy what the run reads. Inputs that are not paths, or do
    not exist, are passed over.

    Raises:
        DeepSpotError: ``output`` is an input, naming it.
    """
    output = Path(output)
    target = output.resolve()
    for source in inputs:
        if not isinstance(source, (str, os.PathLike)) or not str(source) or not Path(source).exists():
            continue
        source = Path(source)
        same = target == source.resolve() or (output.exists() and os.path.samefile(output, source))
        if same or (source.is_dir() and target.is_relative_to(source.resolve())):
            raise DeepSpotError(f"{output}: is an input of this run ({source}); write the {what} elsewhere")


#: How to save names so that they are read back: ``np.asarray(adata.obs_names)`` is an array of Python objects,
#: which ``np.savez`` pickles.
OBJECT_ARRAY_HINT = "save names as text with np.asarray(names, dtype=str)"


def numpy_error(e: BaseException) -> str:
    """Why NumPy could not read an array file, in a user's words. For a file without NumPy's header, or an array of
    Python objects, NumPy says to load it with ``allow_pickle``: advice to run code from the file, never ours."""
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    if "pickle" in text or "Python objects" in text:
        return (
            "not a NumPy array file (no .npy header), or an array of Python objects, which deepspot never unpickles "
            f"({OBJECT_ARRAY_HINT})"
        )
    return text


#: A dataset of an HDF5 file may declare at most this many times the bytes it stores, and at least this many bytes
#: whatever it stores: a small file cannot make a read allocate gigabytes. The ratio is twice deflate's limit (1032:1,
#: which a gzip-compressed chunk of one repeated value comes within 1% of: 4 MiB chunks of zeros store at 1026:1), so
#: that no file h5py's filters compress is refused.
HDF5_MAX_RATIO, HDF5_MIN_BYTES = 2048, 1 << 20


def check_hdf5(group, path: str | Path, members: Iterable[str] | None = None) -> None:
    """Refuse what reading ``members`` of an h5py ``group`` (paths in it; every member by default), each walked
    whole, could do beyond reading ``path``.

    HDF5 lets a file read other files: external links, datasets stored in external files, virtual datasets. It also
    lets a dataset declare far more data than the file stores (chunks never written read as the fill value).

    Raises:
        InputError: The first such link or dataset, named.
    """
    import h5py

    seen = set()

    def visit(obj, name: str) -> None:
        if obj.file.filename != group.file.filename:
            raise InputError(f"{path}: {name} lies in another file ({obj.file.filename}); deepspot reads only {path}")
        if hash(obj.id) in seen:
            return
        seen.add(hash(obj.id))
        if isinstance(obj, h5py.Dataset):
            if obj.is_virtual or obj.id.get_create_plist().get_external_count():
                raise InputError(f"{path}: dataset {name} takes its data from other files; deepspot reads only {path}")
            declared = (obj.size or 0) * obj.dtype.itemsize
            if declared > max(HDF5_MIN_BYTES, HDF5_MAX_RATIO * obj.id.get_storage_size()):
                raise InputError(f"{path}: dataset {name} declares {declared:,} bytes but the file stores "
                                 f"{obj.id.get_storage_size():,} for it")  # fmt: skip
            return
        visit_members(obj, obj)

    def visit_members(obj, keys) -> None:
        for key in keys:
            if key not in obj:
                continue
            if isinstance(obj.get(key, getlink=True), h5py.ExternalLink):
                raise InputError(f"{path}: {obj.name.rstrip('/')}/{key} is a link to another file; deepspot reads "
                                 f"only {path}")  # fmt: skip
            child = obj.get(key)
            if child is not None:
                visit(child, child.name)

    visit_members(group, group if members is None else members)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex, read 1 MiB at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- temporary files and what a killed process leaves ---------------------------------------------------------------
@functools.cache
def host_tag() -> str:
    """Eight hex digits naming this machine and PID namespace: its host name, its boot and the namespace's id.

    A process id means something only there: a shared output folder (a cluster's file system, a container's volume)
    also holds the temporary files of runs elsewhere, whose ids say nothing about the processes here.
    """
    import hashlib
    import socket

    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]



def temp_prefix(name: str) -> str:
    """The prefix of deepspot's hidden temporary files: ``.<name>.pid<N>-<host>.``, so that a later run on the same
    machine can tell the files of a process that died (SIGKILL runs no clean-up) from those of one still writing;
    ``<host>`` is :func:`host_tag`, so files of runs on other machines are never taken for a dead process's."""
    return f".{name}.pid{os.getpid()}-{host_tag()}."


def leftover_pid(name: str) -> int | None:
    """The process id in the name of one of deepspot's temporary files made on this machine, else ``None``."""
    if not name.startswith("."):
        return None
    for digits, tag in re.findall(r"\.pid(\d+)-([0-9a-f]{8})\.", name):
        if tag == host_tag():
            return int(digits)
    return None


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
