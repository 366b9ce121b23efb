"""Sweeps, selections and rounds as the spec loader expands them: names, folders, bindings, configs
and cache keys of the concrete stages, and the errors a user gets for a bad sweep or group."""

import copy

import pytest
import yaml

from llmlab.reuse import cache_key
from llmlab.runners.registry import resolved_config
from llmlab.spec import SpecError, parse_spec
from llmlab.selection import SelectionFailed, choose_branch

BASE = {
    "name": "graph",
    "tokenizer": {"train": {"vocab_size": 300, "data": [{"path": "builtin:stdlib"}]}},
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "max_seq_len": 32},
    "stages": {
        "pretrain": {"kind": "pretrain", "data": [{"path": "builtin:stdlib"}]},
        "sft": {"kind": "sft", "from": "pretrain", "data": [{"path": "builtin:tasks"}]},
        "dpo": {"kind": "dpo", "from": "sft", "data": [{"path": "builtin:tasks-preference"}],
                "sweep": {"beta": [0.1, 0.5], "train.lr": [1.0e-4, 3.0e-4]}},
        "eval": {"kind": "eval", "from": ["sft", "dpo"], "data": [{"path": "builtin:stdlib"}]},
        "release": {"kind": "export", "from": "dpo", "select": {"stage": "eval", "metric": "dpo/exact_match"}},
    },
}
BRANCHES = ["beta=0.1,train.lr=0.0001", "beta=0.1,train.lr=0.0003", "beta=0.5,train.lr=0.0001", "beta=0.5,train.lr=0.0003"]


def load(raw: dict, file: str = "graph.yaml"):
    return parse_spec(yaml.safe_dump(raw, sort_keys=False), file)


def issues(raw: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        load(raw)
    return [(i.path, i.message) for i in err.value.issues]


def edit(**stages) -> dict:
    raw = copy.deepcopy(BASE)
    for name, body in stages.items():
        if body is None:
            raw["stages"].pop(name)
        else:
            raw["stages"][name] = body
    return raw


def test_a_grid_sweep_fans_out_into_named_branches_with_their_own_values_folders_and_keys():
    spec = load(BASE)
    dpo = [f"dpo[{b}]" for b in BRANCHES]
    assert spec.stage_names() == ["tokenizer", "pretrain", "sft", *dpo, *[f"eval[{b}]" for b in BRANCHES], "release"]
    assert [(spec.stages[d].beta, spec.stages[d].train.lr) for d in dpo] == [(0.1, 1e-4), (0.1, 3e-4), (0.5, 1e-4), (0.5, 3e-4)]
    assert str(spec.stage_dir(dpo[1])).endswith("runs/graph/dpo/beta=0.1,train.lr=0.0003")
    assert spec.variant(dpo[1]).values == {"beta": 0.1, "train.lr": 3e-4} and spec.base_stage(dpo[1]) == "dpo"
    # a branch's config is the stage's with the values set, and knows nothing of the sweep
    config = resolved_config(spec, dpo[1])
    assert config["beta"] == 0.1 and config["train"]["lr"] == 3e-4 and "sweep" not in config and "select" not in config
    keys = {cache_key(spec, d, {"sft": {"fingerprint": "f"}}) for d in dpo}
    assert len(keys) == 4
    # the eval that reads dpo fans out with it, binding each branch under the name it was written with
    assert spec.dependencies(f"eval[{BRANCHES[2]}]") == {"tokenizer": "tokenizer", "sft": "sft", "dpo": dpo[2]}
    assert spec.stages[f"eval[{BRANCHES[2]}]"].model_stages == ["sft", "dpo"]  # metric names stay dpo/...
    assert spec.expand_names(["dpo"]) == dpo and spec.expand_names([dpo[0]]) == [dpo[0]]


def test_adding_a_value_leaves_every_existing_branch_with_the_same_config_and_key():
    before = load(BASE)
    raw = copy.deepcopy(BASE)
    raw["stages"]["dpo"]["sweep"]["beta"].append(0.9)
    after = load(raw)
    inputs = {"tokenizer": {"fingerprint": "t"}, "sft": {"fingerprint": "s"}}
    for b in BRANCHES:
        assert cache_key(after, f"dpo[{b}]", inputs) == cache_key(before, f"dpo[{b}]", inputs)
        assert after.stage_dir(f"dpo[{b}]") == before.stage_dir(f"dpo[{b}]")
    new = [n for n in after.stage_names() if n not in before.stage_names()]
    assert new == ["dpo[beta=0.9,train.lr=0.0001]", "dpo[beta=0.9,train.lr=0.0003]",
                   "eval[beta=0.9,train.lr=0.0001]", "eval[beta=0.9,train.lr=0.0003]"]


def test_zip_pairs_the_lists_and_select_binds_each_judge_branch_to_its_upstream_branch():
    raw = copy.deepcopy(BASE)
    raw["stages"]["dpo"]["sweep_mode"] = "zip"
    spec = load(raw)
    assert spec.expand_names(["dpo"]) == ["dpo[beta=0.1,train.lr=0.0001]", "dpo[beta=0.5,train.lr=0.0003]"]
    sel = spec.selection("release")
    assert sel.stage == "eval" and sel.metric == "dpo/exact_match" and sel.mode == "max"
    assert sel.options == {"eval[beta=0.1,train.lr=0.0001]": {"dpo": "dpo[beta=0.1,train.lr=0.0001]"},
                           "eval[beta=0.5,train.lr=0.0003]": {"dpo": "dpo[beta=0.5,train.lr=0.0003]"}}
    assert spec.dependencies("release", chosen="eval[beta=0.5,train.lr=0.0003]")["dpo"] == "dpo[beta=0.5,train.lr=0.0003]"


def test_choose_branch_takes_the_best_metric_first_on_ties_and_says_what_is_missing():
    spec = load(BASE)
    evals = spec.expand_names(["eval"])
    judged = {e: {"metrics": {"dpo/exact_match": v, "dpo/eval/loss": 5 - v}, "mlflow_run_id": str(i)}
              for i, (e, v) in enumerate(zip(evals, [0.2, 0.6, 0.6, 0.1]))}
    choice = choose_branch(spec, "release", judged)
    assert choice.winner == evals[1] and choice.label == BRANCHES[1]  # ties: the branch declared first
    assert [r["chosen"] for r in choice.table] == [False, True, False, False]
    assert choice.table[1]["values"] == {"beta": 0.1, "train.lr": 0.0003} and "**chosen**" in choice.markdown()
    narrowed = {e: judged[e] for e in (evals[0], evals[3])}  # branches left out by --sweep are not compared
    assert choose_branch(spec, "release", narrowed).winner == evals[0]
    with pytest.raises(SelectionFailed, match="dpo/exact_match.*dpo/eval/loss"):
        choose_branch(spec, "release", {e: {"metrics": {"dpo/eval/loss": 1.0}} for e in evals})


def test_narrowing_keeps_the_asked_values_and_what_fans_out_of_them():
    spec = load(BASE)
    keep, problems = spec.graph.narrowed({"dpo": {"beta": [0.5]}})
    assert not problems
    assert sorted(n for n in keep if n.startswith(("dpo", "eval"))) == sorted(
        [f"{s}[{b}]" for s in ("dpo", "eval") for b in BRANCHES[2:]])
    assert {"pretrain", "sft", "release"} <= keep
    _, problems = spec.graph.narrowed({"dpo": {"beta": [0.7]}, "sft": {"train.lr": [1]}})
    assert any("no variant of stage 'dpo'" in p for p in problems) and any("'sft' has no sweep" in p for p in problems)


def test_a_deployments_sweep_parameter_of_the_wrong_shape_is_one_sentence_and_one_value_stands_for_a_list():
    spec = load(BASE)
    keep, problems = spec.graph.narrowed({"dpo": {"beta": 0.5}})  # a bare value: a list of one
    assert not problems and keep == spec.graph.narrowed({"dpo": {"beta": [0.5]}})[0]
    _, problems = spec.graph.narrowed({"dpo": [0.5]})
    assert problems == ['sweep.dpo must map a swept field to the values to keep (e.g. {"dpo": {"beta": [0.1, 0.3]}}), not [0.5]']
    _, problems = spec.graph.narrowed(["dpo"])
    assert len(problems) == 1 and problems[0].startswith("sweep must map a stage to {field: [values]}")


def test_rounds_chain_each_round_from_the_last_rounds_model_and_later_stages_read_the_last_round():
    raw = edit(dpo=None, eval=None, release=None)
    raw["stages"]["prefs"] = {"kind": "preferences", "from": "sft", "data": [{"path": "builtin:tasks-prompts"}],
                              "reward": "exact_match"}
    raw["stages"]["dpo"] = {"kind": "dpo", "from": "prefs"}
    raw["stages"]["eval"] = {"kind": "eval", "from": ["sft", "dpo#1", "dpo"], "data": [{"path": "builtin:stdlib"}]}
    raw["repeat"] = {"stages": ["prefs", "dpo"], "times": 3}
    spec = load(raw)
    assert spec.stage_names()[3:] == ["prefs#1", "dpo#1", "prefs#2", "dpo#2", "prefs#3", "dpo#3", "eval"]
    deps = {n: {k: v for k, v in spec.dependencies(n).items() if k != "tokenizer"} for n in spec.stage_names()[3:]}
    assert deps["prefs#1"] == {"sft": "sft"} and deps["dpo#1"] == {"prefs": "prefs#1"}
    assert deps["prefs#2"] == {"sft": "dpo#1"} and deps["dpo#2"] == {"prefs": "prefs#2"}
    assert deps["prefs#3"] == {"sft": "dpo#2"} and deps["eval"] == {"sft": "sft", "dpo#1": "dpo#1", "dpo": "dpo#3"}
    assert str(spec.stage_dir("dpo#2")).endswith("dpo/round-2") and spec.variant("dpo#2").round == 2
    inputs = {"tokenizer": {"fingerprint": "t"}, "prefs": {"fingerprint": "p"}}
    assert cache_key(spec, "dpo#1", inputs) != cache_key(spec, "dpo#2", inputs)  # each round its own key


def test_bad_sweeps_selects_and_groups_are_reported_at_their_keys():
    raw = copy.deepcopy(BASE)
    raw["stages"]["dpo"]["sweep"] = {"beta": [0.1, -1.0], "train.lrr": [1.0], "from": ["pretrain"]}
    found = issues(raw)
    assert ("stages.dpo.sweep.from", "a sweep varies a stage's settings, not 'from': sweep the upstream stage instead") in found
    raw["stages"]["dpo"]["sweep"] = {"beta": [0.1, -1.0], "train.lrr": [1.0]}
    found = dict(issues(raw))
    assert "greater than 0" in found["stages.dpo.sweep.beta"] and "unknown key 'lrr'" in found["stages.dpo.sweep.train.lrr"]
    raw = copy.deepcopy(BASE)
    raw["stages"]["dpo"]["sweep"] = {"beta": [0.1, 0.5], "train.lr": [1e-4]}
    raw["stages"]["dpo"]["sweep_mode"] = "zip"
    assert "different lengths" in dict(issues(raw))["stages.dpo.sweep_mode"]
    raw = copy.deepcopy(BASE)
    raw["stages"]["dpo"].pop("sweep")
    assert "one branch only" in dict(issues(raw))["stages.release.select.stage"]
    raw = edit(release={"kind": "export", "from": "dpo", "select": {"stage": "evl", "metric": "x"}})
    assert "not a stage declared before" in dict(issues(raw))["stages.release.select.stage"]
    raw = edit(release=None)
    raw["stages"]["bad[name]"] = {"kind": "export", "from": "sft"}
    assert "may not contain" in dict(issues(raw))["stages.bad[name]"]
    raw = edit(release=None)
    raw["repeat"] = {"stages": ["eval", "sft"], "times": 2}
    assert "declared order" in dict(issues(raw))["repeat.stages"]
    raw = edit(release=None)
    raw["repeat"] = {"stages": ["sft"], "times": 2}
    raw["stages"]["eval"]["from"] = ["sft#3"]
    raw["stages"]["dpo"].pop("sweep")
    assert "runs rounds 1 to 2" in dict(issues(raw))["stages.eval.from"]
    raw = copy.deepcopy(BASE)
    raw["promote"] = {"model": "dpo", "gates": ["exact_match >= champion.exact_match"]}
    assert "4 branches" in dict(issues(raw))["promote.model"]
    raw = copy.deepcopy(BASE)
    raw["stages"]["sft"]["gates"] = ["exact_match >= champion.exact_match"]
    assert "promote.gates" in dict(issues(raw))["stages.sft.gates[0]"]


def test_a_spec_without_sweeps_keeps_its_stages_names_and_folders():
    raw = edit(release=None)
    raw["stages"]["dpo"].pop("sweep")
    spec = load(raw)
    assert spec.stage_names() == ["tokenizer", "pretrain", "sft", "dpo", "eval"]
    assert str(spec.stage_dir("dpo")).endswith("runs/graph/dpo")
    assert spec.dependencies("eval") == {"tokenizer": "tokenizer", "sft": "sft", "dpo": "dpo"}
