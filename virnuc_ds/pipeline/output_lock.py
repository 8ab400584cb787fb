"""One run at a time in an output folder.

Two runs on one folder would compute the same parts twice and sweep each other's temporary files
(the background merge's embeddings.h5 among them). Rank 0 holds an advisory lock on
OUT/.virnuc-ds.lock (flock) from the fingerprint check to the end of the run; the kernel drops it
when the process dies, however it dies, so a crashed run never leaves the folder locked. On a file
system without flock support (some NFS mounts) the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from ..errors import VirnucError

log = logging.getLogger("virnuc_ds.run")

LOCK_FILE = ".virnuc-ds.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


class OutputFolderLock:
    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise VirnucError naming the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise VirnucError(f"{self.path.parent} is in use by another virnuc-ds run ({holder}); wait for it "
                              "to end, or use another --output-dir") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: the file system does not support locks (%s); make sure no other run uses this "
                        "output folder", self.path.parent, exc.strerror)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
