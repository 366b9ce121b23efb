"""Tracking cannot break training and loses nothing: what MLflow does not take — from the middle of a
stage, or from the start of a run — waits on disk, in order, and is sent when MLflow answers."""

from types import SimpleNamespace

import pytest

import llmlab.tracking as tracking
from llmlab.tracking import PARAM_VALUE_LIMIT, Outbox, Tracker, flatten, is_local_id

DOWN = "http://127.0.0.1:1"  # nothing listens there: `answers` says no, as for a stopped server


class FlakyClient:
    """An MLflow client whose server can be switched off: calls then raise as a dead server's would."""

    def __init__(self, up=True):
        self.up, self.runs, self.created = up, {}, []
        self.experiments = {}
        self.experiment_tags = {}

    def _check(self):
        if not self.up:
            raise ConnectionError("Connection refused")

    def _run(self, run_id):
        return self.runs.setdefault(run_id, {"metrics": [], "params": {}, "tags": {}, "status": None, "artifacts": [],
                                             "name": None, "start": None, "end": None, "experiment": None})

    def get_experiment_by_name(self, name):
        self._check()
        return SimpleNamespace(experiment_id=self.experiments[name], tags=self.experiment_tags.get(self.experiments[name], {})) \
            if name in self.experiments else None

    def set_experiment_tag(self, experiment_id, key, value):
        self._check()
        self.experiment_tags.setdefault(experiment_id, {})[key] = value

    def create_experiment(self, name, artifact_location=None):
        self._check()
        self.experiments[name] = str(len(self.experiments) + 1)

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        self._check()
        run_id = f"{len(self.created) + 1:032x}"
        self.created.append(run_id)
        run = self._run(run_id)
        run.update(name=run_name, start=start_time, experiment=experiment_id)
        run["tags"].update(tags or {})
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id, metrics=(), params=()):
        self._check()
        self._run(run_id)["metrics"] += [(m.key, m.step, m.value) for m in metrics]
        self._run(run_id)["params"].update({p.key: p.value for p in params})

    def set_tag(self, run_id, key, value):
        self._check()
        self._run(run_id)["tags"][key] = value

    def log_artifact(self, run_id, path, artifact_path=None):
        self._check()
        self._run(run_id)["artifacts"].append((open(path).read(), artifact_path))

    def log_artifacts(self, run_id, path, artifact_path=None):
        self._check()
        self._run(run_id)["artifacts"].append(("<folder>", artifact_path))

    def set_terminated(self, run_id, status, end_time=None):
        self._check()
        self._run(run_id).update(status=status, end=end_time)


@pytest.fixture(autouse=True)
def own_state(state_dir, monkeypatch):
    monkeypatch.setattr(tracking, "_announced", set())
    return state_dir


def test_long_parameter_values_are_shortened_with_a_marker():
    params = flatten({"data": {"path": "x" * 10_000}, "lr": 0.1})
    assert len(params["data.path"]) == PARAM_VALUE_LIMIT and params["lr"] == "0.1"
    assert params["data.path"].endswith("[truncated: 10000 characters; the full value is in the stage's config.json]")


def test_metrics_logged_while_mlflow_is_down_are_sent_in_order_when_it_answers(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    client = FlakyClient()
    run = Tracker(DOWN, client=client, wait_seconds=5).run("r1", label="pretrain")
    run.log_metrics({"train/loss": 3.0}, step=1)
    run.flush()
    client.up = False
    for step in (2, 3):
        run.log_metrics({"train/loss": 3.0 - step / 10}, step=step)
        run.flush()  # never raises
    run.set_tags({"llmlab.fingerprint": "abc"})
    assert [s for _, s, _ in client.runs["r1"]["metrics"]] == [1] and run.delayed == 2
    out = capsys.readouterr().out
    assert f"[pretrain] MLflow at {DOWN} did not answer (ConnectionError: Connection refused)" in out
    assert len(Outbox(DOWN).ops(Outbox(DOWN).file_of("r1"))) == 3  # on disk, in order
    client.up = True
    run.log_metrics({"train/loss": 2.5}, step=4)
    run.finish()
    r1 = client.runs["r1"]
    assert [s for _, s, _ in r1["metrics"]] == [1, 2, 3, 4] and r1["tags"] == {"llmlab.fingerprint": "abc"}
    assert r1["status"] == "FINISHED" and run.unsent == 0 and not Outbox(DOWN).files()
    assert "MLflow answers again: 3 delayed metrics sent" in capsys.readouterr().out


def test_a_server_that_never_comes_back_costs_a_warning_and_the_next_command_sends_it_all(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "RETRY_WAIT", 0.05)
    client = FlakyClient()
    run = Tracker(DOWN, client=client, wait_seconds=0.2).run("r1", label="sft")
    client.up = False
    for step in range(1, 6):
        run.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=step)
    run.finish("FINISHED")  # returns: the stage's work is done
    assert run.unsent == 10 and client.runs.get("r1", {}).get("status") is None
    out = capsys.readouterr().out
    assert f"warning: [sft] MLflow at {DOWN} did not answer for 0 s at the stage's end: 10 metrics (of 10 delayed) " \
           f"and 1 other records wait in {Outbox(DOWN).dir}" in out and "`llmlab sync`" in out
    client.up = True
    Tracker(DOWN, client=client)  # any later command that reaches the server
    assert len(client.runs["r1"]["metrics"]) == 10 and client.runs["r1"]["status"] == "FINISHED"
    assert not Outbox(DOWN).files()


def test_a_run_that_starts_while_mlflow_is_down_is_created_with_all_its_records_when_it_answers(tmp_path, capsys):
    client = FlakyClient(up=False)
    tracker = Tracker(DOWN, experiment="tiny", client=client)
    parent = tracker.start_pipeline_run("tiny", {"llmlab.pipeline": "tiny"})
    assert is_local_id(parent)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"warning: MLflow at {DOWN} does not answer (ConnectionError: Connection refused); " \
                                  f"the run goes on, and its MLflow records wait in {Outbox(DOWN).dir}" in out
    stage = tracker.start_stage_run(parent, "pretrain", "pretrain", tags={"llmlab.config_hash": "h"})
    assert is_local_id(stage.run_id) and stage.run_id != parent
    stage.log_params({"train": {"lr": 0.01}})
    for step in (1, 2, 3):
        stage.log_metrics({"train/loss": 3.0 - step / 10}, step=step)
    temporary = tmp_path / "table.json"
    temporary.write_text('{"kept": true}')
    stage.log_artifact(temporary, "branches")
    temporary.unlink()  # a temporary artifact: the outbox kept a copy
    stage.finish("FINISHED")
    Tracker(DOWN, experiment="tiny", client=client).run(parent).set_tags({"llmlab.stage.pretrain.run_id": stage.run_id})
    assert capsys.readouterr().out == ""  # said once per process, when the run started
    assert client.runs == {}

    client.up = True
    Tracker(DOWN, client=client)  # the next llmlab command that reaches MLflow
    real_parent, real_stage = client.created
    p, s = client.runs[real_parent], client.runs[real_stage]
    assert p["name"] == "tiny" and s["name"] == "pretrain" and s["tags"]["mlflow.parentRunId"] == real_parent
    assert p["tags"]["llmlab.stage.pretrain.run_id"] == real_stage and client.experiments == {"tiny": "1"}
    assert s["metrics"] == [("train/loss", 1, 2.9), ("train/loss", 2, 2.8), ("train/loss", 3, 2.7)]
    assert s["params"] == {"train.lr": "0.01"} and s["artifacts"] == [('{"kept": true}', "branches")]
    assert s["status"] == "FINISHED" and s["end"] is not None and s["start"] < s["end"]
    assert Outbox(DOWN).real_id(stage.run_id) == real_stage and not Outbox(DOWN).files()


def test_a_run_created_after_mlflow_comes_back_hangs_under_the_parent_made_while_it_was_down():
    client = FlakyClient(up=False)
    parent = Tracker(DOWN, client=client).start_pipeline_run("tiny", {})
    client.up = True
    stage = Tracker(DOWN, client=client).start_stage_run(parent, "sft", "sft")
    assert not is_local_id(stage.run_id)
    assert client.runs[stage.run_id]["tags"]["mlflow.parentRunId"] == Outbox(DOWN).real_id(parent) == client.created[0]


def test_an_operation_only_another_process_can_send_waits_for_it(monkeypatch):
    client = FlakyClient(up=False)
    tracker = Tracker(DOWN, client=client)
    run = tracker.run(tracker.start_pipeline_run("tiny", {}))
    run.send({"op": "register-test", "value": 1})
    run.set_tags({"after": "it"})
    client.up = True
    Tracker(DOWN, client=client)  # this process has no handler for it: it and what follows wait
    assert Outbox(DOWN).waiting() == (0, 2)
    seen = []
    monkeypatch.setitem(tracking.HANDLERS, "register-test", lambda tracker, run_id, op: seen.append((run_id, op["value"])))
    Tracker(DOWN, client=client)
    assert seen == [(client.created[0], 1)] and client.runs[client.created[0]]["tags"] == {"after": "it"}


def test_a_record_the_server_refuses_while_it_answers_is_dropped_after_three_tries(monkeypatch, capsys):
    client = FlakyClient(up=False)
    tracker = Tracker(DOWN, client=client)
    run = tracker.run("r1", "x")
    run.set_tags({"a": "1"})
    run.set_tags({"b": "2"})
    client.up = True
    refused = []

    def refuse(run_id, key, value):
        if key == "a":
            refused.append(key)
            raise ValueError("tag value too long")
        client._run(run_id)["tags"][key] = value

    monkeypatch.setattr(client, "set_tag", refuse)
    monkeypatch.setattr(tracking, "answers", lambda uri: True)
    for _ in range(3):
        tracker.sync()
    assert refused == ["a", "a", "a"] and client.runs["r1"]["tags"] == {"b": "2"}
    assert "refused a record of run r1 three times (ValueError: tag value too long); it is dropped" in capsys.readouterr().out


def test_each_try_is_one_request_not_minutes_of_retries(monkeypatch):
    seen = {}

    class Recording(FlakyClient):
        def log_batch(self, run_id, metrics=(), params=()):
            import os
            seen.update({k: os.environ.get(k) for k in tracking.FAIL_FAST})
            super().log_batch(run_id, metrics, params)

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    run = Tracker(DOWN, client=Recording()).run("r1")
    run.log_metrics({"x": 1.0}, step=1)
    run.flush()
    assert seen == tracking.FAIL_FAST  # while sending: one try, short timeout
    import os
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # and restored afterwards


def test_the_outbox_reads_only_whole_lines(own_state):
    box = Outbox(DOWN)
    box.append("r1", {"op": "tag", "key": "a", "value": "1"})
    with open(box.file_of("r1"), "a") as f:
        f.write('{"op": "tag", "key": "b"')  # another process is still writing this one
    assert box.ops(box.file_of("r1")) == [{"op": "tag", "key": "a", "value": "1"}] and box.waiting() == (0, 1)
    assert (box.dir / "uri.txt").read_text() == DOWN


@pytest.mark.parametrize("value", ["short", "y" * PARAM_VALUE_LIMIT])
def test_values_that_fit_are_kept_whole(value):
    assert flatten({"v": value})["v"] == value
