"""The CLI's own parsing and printing, through typer's runner: `--sweep STAGE.FIELD=VALUE` narrows
`llmlab plan` (and `run`) to the asked branches or says in one line what is wrong, and `llmlab runs`
names the version that holds each alias of a registered model."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmlab.cli import app

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "pipelines" / "tiny-sweep.yaml"


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _plan_rows(output: str) -> dict[str, str]:
    """stage -> the plan's decision word (run / reuse / skip) for the lines naming a dpo or eval branch."""
    rows = {}
    for line in output.splitlines():
        words = line.split()
        if words and words[0].startswith(("dpo[", "eval[")):
            rows[words[0]] = words[1]
    return rows


def test_sweep_option_narrows_the_plan_to_the_asked_branches(state):
    result = CliRunner().invoke(app, ["plan", str(SWEEP), "--sweep", "dpo.beta=0.1"])
    assert result.exit_code == 0, result.output
    rows = _plan_rows(result.output)
    assert len(rows) == 8, result.output  # four dpo branches, four eval branches
    for name, decision in rows.items():
        assert (decision == "skip") == ("beta=0.5" in name), (name, decision, result.output)
    both = _plan_rows(CliRunner().invoke(app, ["plan", str(SWEEP), "--sweep", "dpo.beta=0.1",
                                               "--sweep", "dpo.train.lr=0.0003"]).output)
    assert [n for n, d in both.items() if d != "skip"] == ["dpo[beta=0.1,train.lr=0.0003]", "eval[beta=0.1,train.lr=0.0003]"]


@pytest.mark.parametrize("given, says", [
    ("dpo.beta", "--sweep dpo.beta: give STAGE.FIELD=VALUE for a swept stage of"),
    ("sft.train.lr=0.1", "--sweep sft.train.lr=0.1: give STAGE.FIELD=VALUE for a swept stage of"),
    ("dpo.beta=0.7", "--sweep: no variant of stage 'dpo' has {'beta': [0.7]}"),
    ("dpo.gamma=1", "--sweep: stage 'dpo' sweeps beta, train.lr, not gamma"),
])
def test_a_bad_sweep_option_is_one_line_and_exit_2(state, given, says):
    result = CliRunner().invoke(app, ["plan", str(SWEEP), "--sweep", given])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output


def test_runs_names_the_version_holding_each_alias(state):
    from mlflow.tracking import MlflowClient

    from llmlab.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    client.create_registered_model("tiny-sweep")
    folder = state / "model"
    folder.mkdir()
    for _ in range(2):
        client.create_model_version("tiny-sweep", folder.as_uri(), tags={"llmlab.stage": "release"})
    client.set_registered_model_alias("tiny-sweep", "champion", "2")
    result = CliRunner().invoke(app, ["runs", "tiny-sweep"])
    assert result.exit_code == 0, result.output
    assert "champion: tiny-sweep version 2 (stage release, run None)" in result.output
    assert "no pipeline runs recorded yet for 'tiny-sweep'" in result.output
    assert "champion" not in CliRunner().invoke(app, ["runs", "other"]).output
