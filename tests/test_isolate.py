"""A stage run in a process of its own (branches side by side): its result or its one sentence comes
back to the parent, and the child gets its slot's share of the machine."""

import json

import pytest
import yaml

from llmlab.errors import StageFailed
from llmlab.isolate import THREADS_ENV, child_env, default_parallel, execute_stage_isolated


def test_an_expected_failure_in_the_child_comes_back_as_its_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    spec = tmp_path / "iso.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "iso", "workdir": str(tmp_path / "runs"), "tokenizer": {"name": "gpt2"},
        "stages": {"eval": {"kind": "eval", "models": [{"name": "m", "path": str(tmp_path / "missing-model")}],
                            "data": [{"path": "builtin:stdlib"}]}}}))
    with pytest.raises(StageFailed) as err:
        execute_stage_isolated(str(spec), "eval", {}, None)
    assert str(err.value).startswith("stage 'eval': cannot load") and "missing-model" in str(err.value)
    assert err.value.stage_log == str(tmp_path / "runs" / "eval" / "stage.log")
    record = json.loads((tmp_path / "runs" / "eval" / "stage.json").read_text())  # the child wrote the record
    assert record["status"] == "failed" and record["expected"]


def test_each_branch_process_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env = child_env(slot=1, slots=4)
    assert env[THREADS_ENV] == env["OMP_NUM_THREADS"] == "2"
    assert default_parallel(3) == 3 and default_parallel(None) >= 1
