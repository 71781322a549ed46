"""Children that die with their parent (`die_with_parent`), and one launch per folder (`exclusive`): with
real processes, each property next to a control showing what happens without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from deepspec.models.errors import DeepSpecError
from deepspec.tasks.processes import alive, exclusive

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="parent-death signals are Linux's"
)


def _parent_with_child(die_with_parent: bool) -> tuple[subprocess.Popen, int]:
    """A parent process that starts a sleeping child (with or without the parent-death signal) and
    prints the child's pid; returns (parent, child pid)."""
    preexec = "die_with_parent" if die_with_parent else "None"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        from deepspec.tasks.processes import die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn={preexec})
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


def _gone_within(pid: int, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("with_signal", [True, False], ids=["die_with_parent", "control"])
def test_a_child_dies_with_its_killed_parent_only_when_asked(with_signal):
    parent, child = _parent_with_child(with_signal)
    parent.kill()  # SIGKILL: the parent runs no cleanup
    parent.wait()
    try:
        assert _gone_within(child, 5) == with_signal
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_second_launch_in_the_same_folder_fails_naming_the_holder(tmp_path):
    lock = tmp_path / ".launch.lock"
    with exclusive(lock, "training of x"):
        with pytest.raises(DeepSpecError, match=rf"training of x is already running .*pid {os.getpid()}"):
            with exclusive(lock, "training of x"):
                pass
    with exclusive(lock, "training of x"):  # released at exit
        pass


def test_a_child_given_the_lock_holds_it_after_its_launcher_lets_go(tmp_path):
    lock = tmp_path / ".launch.lock"
    with exclusive(lock, "training") as fd:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(fd,))
    try:
        with pytest.raises(DeepSpecError, match="already running"):
            with exclusive(lock, "training"):
                pass
    finally:
        child.kill()
        child.wait()
    with exclusive(lock, "training"):  # the kernel drops it with its last holder
        pass
