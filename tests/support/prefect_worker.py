"""The recipe at the top of `deployments/prefect.yaml`, typed as written against a real Prefect server:
`prefect work-pool create ...`, `prefect deploy ...`, then `prefect worker start ...` left running. Also
what tests look for in the machine's process table (ranks by their command line, a flow run's process by
the environment Prefect gives it)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "deployments" / "prefect.yaml"


def recipe_commands() -> list[list[str]]:
    """The `prefect ...` commands of prefect.yaml's opening comment, in order."""
    commands = []
    for line in RECIPE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("prefect "):
            commands.append(shlex.split(text))
    return commands


def _run(argv: list[str], env: dict[str, str]) -> None:
    binary = str(Path(sys.executable).with_name(argv[0]))
    done = subprocess.run([binary, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@contextmanager
def deployed_worker(api_url: str, home: Path, worker_env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Create the pools, deploy everything and start the worker (with `worker_env` added to its
    environment) as the recipe says; yields the worker process (its log: home/worker.log) and stops it,
    with the flow runs it started, at the end."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    *setup, start = recipe_commands()
    assert start[:3] == ["prefect", "worker", "start"], f"the recipe must end by starting a worker: {start}"
    for argv in setup:
        _run(argv, env)
    log = home / "worker.log"
    with log.open("ab") as out:
        binary = str(Path(sys.executable).with_name("prefect"))
        worker = subprocess.Popen([binary, *start[1:]], cwd=REPO, env={**env, **worker_env}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield worker
    finally:
        # its flow runs are over; a worker takes 10 s or more to wind down on SIGTERM or SIGINT
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def processes_with(text: str) -> list[int]:
    """Pids of the live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def flow_run_process(flow_run_id: str) -> int | None:
    """The pid of the process running a flow run: Prefect puts the run's id in that process's
    environment, which its children (torchrun, ranks) inherit, so it is the one whose parent lacks it."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    holders: dict[int, int] = {}  # pid -> parent pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                holders[int(entry.name)] = int(stat[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    tops = [pid for pid, parent in holders.items() if parent not in holders]
    return tops[0] if len(tops) == 1 else None


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.5):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
