"""Atomic writes: a file is either complete under its final name or absent.

Everything is written to a temporary file in the destination's folder, flushed, fsync'd and renamed
over the final name (rename is atomic within one file system, including NFS and Lustre for files).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a result must get the modes any other file
# written by this user gets (0o666 less the umask), so colleagues sharing a project folder can read
# it. Read once, at import: os.umask can only be read by setting it, which is not thread-safe.
FILE_MODE = 0o666 & ~_current_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, durable: bool = True):
    """Yield a temporary path beside `final`; rename it to `final` when the block succeeds.

    The temporary name starts with '.' and ends with '.tmp', so nothing reading the folder takes it
    for a result. On an exception the temporary file is removed and `final` is left untouched.
    durable=False skips the fsyncs: readers still never see a half-written file, but a power cut
    may lose the latest version (for status files rewritten all the time).
    """
    tmp = temporary_path(final)
    try:
        yield tmp
        if durable:
            durable_rename(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_path(final: str | os.PathLike) -> Path:
    """A fresh temporary path beside `final` (the name atomic_path uses), for writers that finish
    with durable_rename themselves, e.g. in another thread."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return Path(tmp)


def durable_rename(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """fsync the finished temporary file, rename it over `final`, fsync the folder."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "w", durable: bool = True, **kwargs):
    """Open a temporary file for writing; it becomes `final` only if the block succeeds."""
    with atomic_path(final, durable) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def is_absent(folder: str | os.PathLike) -> bool:
    """Nothing is at `folder` yet (so a run that creates it may remove it again). A name the file
    system refuses counts as present: ensure_writable_dir reports it."""
    try:
        return not Path(folder).exists()
    except OSError:
        return False


def remove_if_left_empty(folder: str | os.PathLike, leftovers: tuple[str, ...] = ()) -> None:
    """Remove a folder this process created, if it holds nothing but `leftovers` (files, or empty
    folders); anything else in it keeps it. For a run refused before it wrote anything."""
    folder = Path(folder)
    try:
        for name in leftovers:
            path = folder / name
            if path.is_dir():
                path.rmdir()  # only if empty
            else:
                path.unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass  # something else is in it: kept, as it is


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create the folder if needed and prove it writable; InputError (one line) if not."""
    from .errors import InputError

    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise InputError(folder, "is a file, not a folder: name a folder to write into")
        folder.mkdir(parents=True, exist_ok=True)
        # a unique name: ranks on several nodes probe one shared folder at once, and their pids
        # can coincide (containers, PID namespaces); a shared name made one rank's unlink fail
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(folder, f"output folder is not writable ({exc.strerror or exc})") from None
    return folder


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete '.name.*.tmp' leftovers of writers killed mid-write; returns how many were removed."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed += 1
    return removed
