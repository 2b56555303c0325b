"""One run per run folder: an exclusive lock on ``<run folder>/.lock``.

The lock is a ``flock`` on the file, which holds the holder's PID, host and start time. The
kernel releases a ``flock`` when its holder dies, however it dies, so a lock file left by a
killed run (its PID no longer running) is taken over, and said so. The file is removed when
the holder releases the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.common import log
from pipeline.errors import InputError


def holder(lock: Path) -> dict:
    """``{"pid", "host", "started"}`` read from a lock file (empty when unreadable)."""
    try:
        pid, host, started = (lock.read_text().split("\n") + ["", "", ""])[:3]
        return {"pid": int(pid), "host": host, "started": started}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by_parent(lock: Path) -> bool:
    """Whether this process's parent holds ``lock`` (a stage process started by ``run``)."""
    return holder(lock).get("pid") == os.getppid() and os.environ.get("QLORA_MERGE_PARENT") == str(os.getppid())


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold the exclusive lock of run folder ``root`` for the block. A folder created here and left
    empty (the run refused to start) is removed again.

    Raises:
        InputError: another live run holds it (naming its PID, host and start time), or the
            folder cannot be written (read-only, full disk), naming the folder.
    """
    root, lock = Path(root), Path(root) / ".lock"
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                h = holder(lock)
                who = f"PID {h['pid']} on {h['host']}, started {h['started']}" if h else "a process starting up"
                raise InputError(
                    f"run folder '{root}' is in use by another run ({who}); wait for it to finish, or set "
                    "output.run_name (or --output-dir) to another folder."
                ) from None
            try:  # the file we locked may have been removed by its previous holder meanwhile
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = holder(lock)
        if old and old["pid"] != os.getpid() and not (old["host"] == socket.gethostname() and _alive(old["pid"])):
            log(f"the lock of '{root}' was left by PID {old['pid']} (no longer running); taken over")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise InputError(
                f"run folder '{root}' cannot be written ({e.strerror}); make it writable, free space, or set "
                "output.dir to another folder."
            ) from None
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()  # a folder this run created and left empty (it refused to start)
