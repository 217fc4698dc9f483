"""One training process per run directory: an OS file lock on `<workdir>/.lock`.

Two processes training in one directory destroy each other's checkpoints (orbax's start-up
cleanup deletes the other's in-flight step) and both exit 0. `hold` takes an exclusive,
non-blocking `fcntl.flock` on the lock file for the life of the run; the OS releases it when the
process ends, however it ends (SIGKILL included), so a stale lock cannot block a resume. The file
records who holds it, for the refusal message.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live process trains in the run directory."""


def _holder(path: Path) -> str:
  try:
    info = json.loads(path.read_text() or "{}")
    return (f"pid {info['pid']} on host {info['host']}, started {info['started']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


def _lock_or_refuse(fd: int, path: Path, workdir) -> None:
  """Takes the lock on `fd` without waiting, or raises WorkdirLockedError naming its holder."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise WorkdirLockedError(
        f"{workdir} is in use by a training run ({_holder(path)}); wait for it to finish or "
        "stop it, or use another --workdir") from None


def refuse_if_held(workdir) -> None:
  """Raises WorkdirLockedError if a live process holds `workdir`'s lock; writes nothing.

  Lets a run check, before it reads the directory's checkpoints (which a live run may be
  rewriting), that it would get the lock; `hold` takes it afterwards.
  """
  path = Path(workdir) / LOCK_FILE
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return
  try:
    _lock_or_refuse(fd, path, workdir)
  finally:
    os.close(fd)


@contextlib.contextmanager
def hold(workdir):
  """Holds the lock of `workdir` (which must exist) for the `with` block; refuses if held."""
  path = Path(workdir) / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)   # never truncates: the holder's record stays
  try:
    _lock_or_refuse(fd, path, workdir)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.datetime.now().isoformat(timespec="seconds")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    yield path
  finally:
    os.close(fd)   # releases the lock
