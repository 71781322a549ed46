"""A real S3 server for tests and benches: `rclone serve s3` over a local directory, on 127.0.0.1.

server = S3Server(shutil.which("rclone"), root, log)   # buckets are the directories under root
server.start(); ...; server.stop()                      # same directory and port when started again
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from pathlib import Path


class S3Server:
    """`rclone serve s3` over a local directory: a real S3 endpoint on 127.0.0.1 that tests may stop and
    start again (same directory, same port). Buckets are the directories under `root`."""

    key, secret = "deepspec-test", "deepspec-test-secret"

    def __init__(self, binary: str, root: Path, log: Path):
        self.binary, self.root, self.log = binary, root, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def storage_options(self) -> dict:
        """s3fs options: the endpoint and keys, and one attempt per request so a dead server fails fast."""
        return {
            "key": self.key,
            "secret": self.secret,
            "endpoint_url": self.endpoint_url,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        }

    def start(self, timeout_s: float = 30.0) -> None:
        args = [self.binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}"]
        args += ["--auth-key", f"{self.key},{self.secret}", str(self.root)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"rclone serve s3 exited ({self.process.returncode}): {self.log.read_text()}"
                )
            try:  # any HTTP answer (403 without a signature) means it serves
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not answer within {timeout_s} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
