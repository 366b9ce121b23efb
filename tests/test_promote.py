"""Promotion against a real MLflow registry (SQLite): the first version takes the alias on its
absolute gates, a worse one is refused and the alias stays, a better one takes it over; the metrics
the gates read come from the promoted stage and the eval branch that judged it."""

import copy

import pytest
import yaml

from llmlab.promote import promote, promotion_metrics
from llmlab.spec import parse_spec

SPEC = {
    "name": "promo",
    "tokenizer": {"train": {"vocab_size": 300, "data": [{"path": "builtin:stdlib"}]}},
    "stages": {
        "pretrain": {"kind": "pretrain", "data": [{"path": "builtin:stdlib"}]},
        "dpo": {"kind": "dpo", "from": "pretrain", "data": [{"path": "builtin:tasks-preference"}],
                "sweep": {"beta": [0.1, 0.5]}},
        "eval": {"kind": "eval", "from": ["pretrain", "dpo"], "data": [{"path": "builtin:stdlib"}]},
        "release": {"kind": "export", "from": "dpo", "select": {"stage": "eval", "metric": "dpo/exact_match"}},
    },
    "promote": {"model": "release", "metrics_from": "eval", "gates": ["exact_match >= champion.exact_match",
                                                                      "exact_match >= 0.2"]},
}


@pytest.fixture
def registry(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("promo")
    return client


def version(client, tmp_path, exact_match: float) -> str:
    folder = tmp_path / f"model-{exact_match}"
    folder.mkdir()
    v = client.create_model_version("promo", folder.as_uri(), tags={"llmlab.metric.exact_match": str(exact_match)})
    return str(v.version)


def test_the_alias_moves_only_to_a_version_whose_gates_hold_against_the_champion(registry, tmp_path):
    spec = parse_spec(yaml.safe_dump(SPEC, sort_keys=False))
    low = version(registry, tmp_path, 0.1)
    first = promote(registry, spec, "promo", low, {"exact_match": 0.1})
    assert not first.promoted and "exact_match >= 0.2" in first.reason  # the absolute gate still applies
    v1 = version(registry, tmp_path, 0.5)
    first = promote(registry, spec, "promo", v1, {"exact_match": 0.5})
    assert first.promoted and first.champion_version is None
    assert [g["bound"] for g in first.gates] == ["no champion yet", 0.2]
    assert str(registry.get_model_version_by_alias("promo", "champion").version) == v1
    v2 = version(registry, tmp_path, 0.4)
    worse = promote(registry, spec, "promo", v2, {"exact_match": 0.4})
    assert not worse.promoted and worse.champion_version == v1 and worse.champion_metrics == {"exact_match": 0.5}
    assert "exact_match = 0.4, bound >= champion's exact_match = 0.5" in worse.reason
    assert str(registry.get_model_version_by_alias("promo", "champion").version) == v1  # unchanged
    v3 = version(registry, tmp_path, 0.6)
    better = promote(registry, spec, "promo", v3, {"exact_match": 0.6})
    assert better.promoted and better.champion_version == v1 and better.gates[0]["bound"] == 0.5
    assert str(registry.get_model_version_by_alias("promo", "champion").version) == v3


def test_promotion_reads_the_promoted_stage_and_the_eval_branch_that_judged_it():
    spec = parse_spec(yaml.safe_dump(SPEC, sort_keys=False))
    results = {
        "release": {"metrics": {"export/bytes": 10.0}},
        "eval[beta=0.1]": {"metrics": {"dpo/exact_match": 0.3, "pretrain/exact_match": 0.0}},
        "eval[beta=0.5]": {"metrics": {"dpo/exact_match": 0.7, "pretrain/exact_match": 0.0,
                                       "dpo/bench/llmlab_tasks_mc/acc": 0.8, "dpo/bench/llmlab_tasks_mc/contamination": 0.0}},
    }
    metrics = promotion_metrics(spec, results, {"release": "eval[beta=0.5]"})
    assert metrics["exact_match"] == 0.7 and metrics["dpo/exact_match"] == 0.7 and metrics["export/bytes"] == 10.0
    # benchmark scores and contamination are read like any other metric the eval reported for the model
    assert metrics["bench/llmlab_tasks_mc/acc"] == 0.8 and metrics["bench/llmlab_tasks_mc/contamination"] == 0.0
    raw = copy.deepcopy(SPEC)
    raw["promote"].pop("metrics_from")
    spec = parse_spec(yaml.safe_dump(raw, sort_keys=False))
    assert promotion_metrics(spec, results, {"release": "eval[beta=0.5]"}) == {"export/bytes": 10.0}
