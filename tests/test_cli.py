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


def test_a_prefect_api_that_does_not_answer_is_one_sentence_before_anything_runs(state, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    out = CliRunner().invoke(app, ["run", str(ROOT / "pipelines" / "tiny.yaml")])
    assert out.exit_code == 2, out.output
    assert out.output.strip() == (f"the Prefect API at {url} (PREFECT_API_URL) does not answer: start it with `make "
                                  f"serve`, or unset PREFECT_API_URL to run on llmlab's local server")
    assert not (state / "runs").exists()


def test_sync_says_what_it_sent_and_what_still_waits(state, monkeypatch):
    import llmlab.tracking as tracking
    from llmlab.tracking import Outbox, Tracker

    monkeypatch.setattr(tracking, "_announced", set())
    down = "http://127.0.0.1:1"
    assert CliRunner().invoke(app, ["sync"]).output.strip() == "nothing waits: MLflow has every record"
    run = Tracker(down).run("r1", "x")
    run.set_tags({"a": "1"})  # the server at `down` does not answer: it waits on disk
    out = CliRunner().invoke(app, ["sync"])
    assert out.exit_code == 1
    assert out.output.strip() == f"{down}: does not answer; 0 metrics and 1 other records still wait in {Outbox(down).dir}"
    Outbox(down).dir.joinpath("uri.txt").unlink()  # forget that server

    from mlflow.tracking import MlflowClient

    from llmlab.tracking import default_tracking_uri

    local = default_tracking_uri()  # the state dir's SQLite store: it answers
    client = MlflowClient(local)
    real = client.create_run(client.create_experiment("x")).info.run_id
    Outbox(local).append(real, {"op": "tag", "key": "sent.later", "value": "yes"})
    Outbox(local).append(real, {"op": "metrics", "items": [["loss", 1.5, 1000, 3]]})
    out = CliRunner().invoke(app, ["sync"])
    assert out.exit_code == 0 and out.output.strip() == f"{local}: sent 1 metrics and 1 other records", out.output
    assert client.get_run(real).data.tags["sent.later"] == "yes" and client.get_run(real).data.metrics == {"loss": 1.5}
