"""One writer per run folder: an exclusive OS file lock, held for the process's life.

Two trainers writing one checkpoint folder (a cluster scheduler restarting a
job whose old process still runs) interleave their checkpoints, overwrite
each other's `flags.txt` and mix their TensorBoard curves (issue 19). The
first writer therefore takes an exclusive `fcntl.flock` on `<folder>/.lock`
and keeps it until it exits; the kernel releases it when the process dies in
any way (SIGKILL included), so a lock file left behind by a killed run never
blocks its resume: only a live holder counts, the file's contents are a
description of it (pid, host, start time), rewritten by each new holder.

```python
lock = emc2_tf.lock_run_folder("checkpoints/emc2")  # FolderInUseError if another process holds it
```

`TrainingCheckpoint` takes it before its first write; `trainers.train` takes
it before anything is written into `--checkpoint_dir`. Under
MultiWorkerMirroredStrategy only the chief writes the folder, so only the
chief locks it.

Stdlib only (no TensorFlow), so a process can take the lock cheaply.
Network file systems: `flock` is emulated with POSIX locks on Linux NFS
clients; a file system without locks makes `lock_run_folder` raise `OSError`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time

#: The lock file inside a run folder (never deleted: removing a lock file races
#: with a process that has it open).
LOCK_FILE = ".lock"

#: TensorFlow's temporary folder of a checkpoint being written (`ckpt-<step>_temp`):
#: a SIGKILL mid-save leaves it behind.
_TEMPORARY = re.compile(r"^ckpt-\d+_temp$")

#: The locks this process holds, by real path: a second request returns the same lock
#: (flock would refuse a second open file of the same process).
_HELD: dict[str, "RunLock"] = {}


class FolderInUseError(RuntimeError):
    """Another live process holds the run folder's lock.

    Attributes:
        directory: the folder.
        holder: who holds it, e.g. "pid 4242 on host gpu-3 (started 2026-05-01 12:00:00 UTC)".
    """

    def __init__(self, directory: str, holder: str):
        super().__init__(f"{directory} is in use by {holder}")
        self.directory = directory
        self.holder = holder


class RunLock:
    """The exclusive lock on one run folder, held by this process until `release()` or exit.

    Use `lock_run_folder` rather than the constructor: it returns the lock this
    process already holds, if any.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Takes the lock or raises `FolderInUseError` naming the live holder.

        Creates the folder if needed. The lock file is opened without
        truncation, so a refused process changes nothing on disk.
        """
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUseError(self.directory, _describe_holder(self.path)) from None
        except OSError:
            os.close(fd)
            raise
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": started}) + "\n"
        os.ftruncate(fd, 0)  # the stale description of a dead holder goes
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Gives the lock up (the file stays: see `LOCK_FILE`)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        _HELD.pop(os.path.realpath(self.directory), None)

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(path: str) -> str:
    """ "pid P on host H (started T)" from the lock file, read while its holder may be
    writing it (an empty file is retried for up to 1 s)."""
    for _ in range(20):
        try:
            with open(path) as handle:
                record = json.loads(handle.read() or "null")
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and "pid" in record:
            return (f"pid {record['pid']} on host {record.get('host', '?')} "
                    f"(started {record.get('started', '?')})")
        time.sleep(0.05)
    return f"another process (its {path} names no holder yet)"


def remove_temporary_folders(directory: str) -> list[str]:
    """Deletes the `ckpt-<step>_temp` folders a killed save left in `directory`; returns
    their names. Call it only while holding the folder's lock (no save is running)."""
    removed = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if _TEMPORARY.match(name) and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    return removed


def lock_run_folder(directory: str) -> RunLock:
    """Takes (or returns, if this process already holds it) the exclusive lock on
    `directory`, held until the process exits; then removes the temporary folders
    of a killed save (`remove_temporary_folders`).

    Raises:
        FolderInUseError: another live process holds it; its message names the
            holder's pid, host and start time. Nothing was written.
    """
    key = os.path.realpath(directory)
    lock = _HELD.get(key)
    if lock is None or not lock.held:
        lock = RunLock(directory).acquire()
        _HELD[key] = lock
        remove_temporary_folders(directory)
    return lock
