"""Tracking cannot break training: what MLflow does not take is kept, sent later, and counted."""

import pytest

import llmlab.tracking as tracking
from llmlab.tracking import PARAM_VALUE_LIMIT, StageRun, flatten


class FlakyClient:
    """An MLflow client whose server can be switched off: calls then raise as a dead server's would."""

    def __init__(self):
        self.up, self.metrics, self.params, self.tags, self.status = True, [], {}, {}, None

    def _check(self):
        if not self.up:
            raise ConnectionError("Connection refused")

    def log_batch(self, run_id, metrics=(), params=()):
        self._check()
        self.metrics += [(m.key, m.step, m.value) for m in metrics]
        self.params.update({p.key: p.value for p in params})

    def set_tag(self, run_id, key, value):
        self._check()
        self.tags[key] = value

    def set_terminated(self, run_id, status):
        self._check()
        self.status = status


def test_long_parameter_values_are_shortened_with_a_marker():
    params = flatten({"data": {"path": "x" * 10_000}, "lr": 0.1})
    assert len(params["data.path"]) == PARAM_VALUE_LIMIT and params["lr"] == "0.1"
    assert params["data.path"].endswith("[truncated: 10000 characters; the full value is in the stage's config.json]")


def test_metrics_logged_while_mlflow_is_down_are_sent_in_order_when_it_answers(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    client = FlakyClient()
    run = StageRun(client, "r1", "http://127.0.0.1:1", wait_seconds=5, label="pretrain")
    run.log_metrics({"train/loss": 3.0}, step=1)
    run.flush()
    client.up = False
    for step in (2, 3):
        run.log_metrics({"train/loss": 3.0 - step / 10}, step=step)
        run.flush()  # never raises
    run.set_tags({"llmlab.fingerprint": "abc"})
    assert [s for _, s, _ in client.metrics] == [1] and run.delayed == 2
    assert "MLflow at http://127.0.0.1:1 did not answer (ConnectionError: Connection refused)" in capsys.readouterr().out
    client.up = True
    run.log_metrics({"train/loss": 2.5}, step=4)
    run.finish()
    assert [s for _, s, _ in client.metrics] == [1, 2, 3, 4] and client.tags == {"llmlab.fingerprint": "abc"}
    assert client.status == "FINISHED" and run.unsent == 0
    assert "MLflow answers again: 2 delayed metrics sent" in capsys.readouterr().out


def test_a_server_that_never_comes_back_costs_a_warning_not_the_stage(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "RETRY_WAIT", 0.05)
    client = FlakyClient()
    run = StageRun(client, "r1", "http://127.0.0.1:1", wait_seconds=0.2, label="sft")
    client.up = False
    for step in range(1, 6):
        run.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=step)
    run.finish("FINISHED")  # returns: the stage's work is done
    assert run.unsent == 10 and client.status is None
    out = capsys.readouterr().out
    assert "warning: [sft] MLflow at http://127.0.0.1:1 did not answer for 0 s at the stage's end: 10 metrics" in out
    assert "metrics.jsonl has every metric" in out


def test_each_retry_tries_once_not_for_minutes(monkeypatch):
    seen = {}

    class Recording(FlakyClient):
        def log_batch(self, run_id, metrics=(), params=()):
            import os
            seen.update({k: os.environ.get(k) for k in tracking.FAIL_FAST})
            super().log_batch(run_id, metrics, params)

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    run = StageRun(Recording(), "r1")
    run.log_metrics({"x": 1.0}, step=1)
    run.flush()
    assert seen == tracking.FAIL_FAST  # while sending: one try, short timeout
    import os
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # and restored afterwards


@pytest.mark.parametrize("value", ["short", "y" * PARAM_VALUE_LIMIT])
def test_values_that_fit_are_kept_whole(value):
    assert flatten({"v": value})["v"] == value
