"""One writer per run directory.

A run holds an exclusive ``flock`` on ``<run-dir>/.lock`` for as long as its process lives;
the kernel drops the lock when the process ends in any way (SIGKILL included), so no stale
lock is ever left behind. Forked loader workers share the lock and exit within seconds of their
parent's death, so after a SIGKILL it may take that long to be free. On a filesystem that
cannot lock (NFS without lockd, Lustre mounted ``noflock``) the run goes on unlocked, with a
warning. The file records the holder's pid and host, which a refused second
writer is told.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

__all__ = ["RunDirLocked", "RunLock"]

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class RunDirLocked(RuntimeError):
    """Another live process is writing to this run directory."""


class RunLock:
    """The lock on ``run_dir`` (created if missing), held until :meth:`release` or the process ends.

    Raises:
        RunDirLocked: another process holds it; the message names its pid and host.
    """

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise RunDirLocked(f"{run_dir} is in use by {holder}; wait for it to finish (or stop it) before "
                               f"writing to this run dir, or choose another --run-dir") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: this filesystem has no working flock
            log.warning("cannot lock %s (%s); training on without the lock, so a second writer would not be "
                        "refused", self.path, e.strerror or e)
            os.close(self._fd)
            self._fd = None
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()
