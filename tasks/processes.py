"""Child processes that die with the process that started them, and one live launch per directory.

A flow process killed outright (a dead worker, a forced cancel: SIGKILL) runs no cleanup, so children
it started would go on alone: a torchrun rank would finish training and write the draft, holding its
GPUs meanwhile, while a re-run writes into the same checkpoint directory. Linux's parent-death signal
(`prctl(PR_SET_PDEATHSIG)`) has the kernel kill a child when its parent exits, however it exits:

    subprocess.run(command, preexec_fn=die_with_parent)   # torchrun dies with the stage
    die_with_parent(); exit_if_orphaned(launcher_pid)     # each rank, first thing: dies with torchrun

`exclusive(path)` holds a non-blocking `flock` on a file for as long as a launch lives, so a second
launch into the same directory fails at once instead of sharing it; the lock is the kernel's, so it
goes away with its last holder, never stale.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from deepspec.models.errors import DeepSpecError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_PID_ENV = "DEEPSPEC_LAUNCHER_PID"


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux; elsewhere nothing).
    Safe as a `preexec_fn`: it runs in the child between fork and exec, and the setting survives exec."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True  # no /proc: trust kill(0)
    return state != "Z"


def exit_if_orphaned() -> None:
    """A rank's parent-death signal is set only once the rank runs; if the launcher that started its
    torchrun ($DEEPSPEC_LAUNCHER_PID) died before that, nothing would stop the rank: it exits instead."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and not alive(int(launcher)):
        sys.exit(f"the process that launched this rank (pid {launcher}) is gone; exiting")


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[int]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs; yields its file
    descriptor, which a child given it (`pass_fds`) keeps holding. Raises DeepSpecError naming the
    holder when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DeepSpecError(
                f"{what} is already running (lock {path}, held by pid {holder}): wait for it to end, "
                "or stop that process"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock, unless a child still holds the same open file
