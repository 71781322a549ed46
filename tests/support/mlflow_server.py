"""A real MLflow tracking server for tests: `mlflow server` on 127.0.0.1 with its own SQLite store and a
served artifact folder (clients upload artifacts through it, as to a team's server)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def mlflow_server(root: Path, timeout_s: float = 90.0) -> Iterator[str]:
    """Start the server over `root` (store and artifacts), yield its URI, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    store, artifacts = f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")
    args = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", store, "--artifacts-destination", artifacts]  # fmt: skip
    log = root / "server.log"
    with log.open("ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({process.returncode}): {log.read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not answer within {timeout_s} s: {log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
