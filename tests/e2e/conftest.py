"""Shared fixtures for whole-pipeline tests: one Prefect test server for the session."""

import pytest


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Own state dir (MLflow store, caches, Prefect results) and cwd for one test."""
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    return tmp_path
