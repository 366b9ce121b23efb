"""Shared fixtures for whole-pipeline tests: one Prefect test server for the session, and one finished
run of the shrunk tiny pipeline that tests read or copy instead of each training its own."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import shrunk_tiny


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def api_url(harness) -> str:
    """The test server's API: `llmlab run` subprocesses given it as PREFECT_API_URL skip starting a
    temporary server of their own."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Own state dir (MLflow store, caches, Prefect results) and cwd for one test."""
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@dataclass
class Finished:
    project: Path  # the folder it ran from: the spec, `runs/` (the workdir, relative) and `state/`
    spec: Path
    results: dict  # the flow's {stage: result}

    @property
    def runs(self) -> Path:
        return self.project / "runs"

    @property
    def state(self) -> Path:
        return self.project / "state"


@pytest.fixture(scope="session")
def finished_tiny(harness, tmp_path_factory) -> Finished:
    """pipelines/tiny.yaml shrunk (`helpers.shrunk_tiny`), run once through the flow from a project
    folder of its own, with a relative workdir, so a copy of the folder is the same project moved.
    Read it through `finished_project` (which runs a test from inside it) or work on `tiny_copy`."""
    from flows.pipeline import pipeline

    project = tmp_path_factory.mktemp("finished-tiny")
    spec = shrunk_tiny(project, "tiny-test", workdir="runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("LLMLAB_STATE_DIR", str(project / "state"))
        results = pipeline(spec=str(spec))
    return Finished(project, spec, results)


@pytest.fixture
def finished_project(finished_tiny, monkeypatch) -> Finished:
    """The finished run, with the test running from its folder and its state dir: read, never change."""
    monkeypatch.chdir(finished_tiny.project)
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(finished_tiny.state))
    return finished_tiny


@pytest.fixture
def tiny_copy(finished_tiny, tmp_path, monkeypatch) -> Finished:
    """A copy of the finished project that a test may change, as if the folder had been moved here:
    the test runs from it, with its state dir, and its stages belong to its own spec file."""
    project = tmp_path / "project"
    shutil.copytree(finished_tiny.project, project)
    spec = project / finished_tiny.spec.name
    for record_file in (project / "runs").rglob("stage.json"):
        record = json.loads(record_file.read_text())
        record["spec_file"] = str(spec.resolve())
        record_file.write_text(json.dumps(record))
    monkeypatch.chdir(project)
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(project / "state"))
    return Finished(project, spec, finished_tiny.results)
