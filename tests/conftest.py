"""Session fixtures shared by the test suite: the offline assets and one MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """`../shared/assets` beside the repository (or $DEEPSPEC_ASSETS); skips the test when absent."""
    path = Path(os.environ.get("DEEPSPEC_ASSETS") or Path(__file__).parents[1].parent / "shared" / "assets")
    if not path.is_dir():
        pytest.skip(f"offline test assets not found at {path}; set DEEPSPEC_ASSETS to their folder")
    return path


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
