"""The spec: every shipped pipeline validates; each rule fails with its path, line and fix."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from llmlab.spec import SpecError, json_schema, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))

BASE = """
name: t
tokenizer: {train: {vocab_size: 512, data: [{path: builtin:stdlib}]}}
model: {d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128, n_layers: 2, max_seq_len: 32}
stages:
  pretrain: {kind: pretrain, data: [{path: builtin:stdlib}], train: {max_steps: 10, warmup_steps: 1}}
  eval: {kind: eval, from: pretrain, data: [{path: builtin:stdlib}]}
"""


def issues_of(text: str) -> list:
    with pytest.raises(SpecError) as err:
        parse_spec(textwrap.dedent(text), "x.yaml")
    return err.value.issues


def with_changes(**blocks) -> str:
    raw = yaml.safe_load(BASE)
    for dotted, value in blocks.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_shipped_pipeline_validates(path):
    spec = load_spec(path)
    assert spec.stages


def test_base_is_valid_and_has_the_training_defaults():
    spec = parse_spec(BASE)
    train = spec.stages["pretrain"].train
    # the training defaults of a pretrain stage
    assert (train.lr, train.weight_decay, train.scheduler, train.grad_clip) == (3e-4, 0.1, "cosine", 1.0)
    assert (train.batch_sequences, train.gradient_accumulation_steps, train.eval_every, train.eval_steps) == (1, 64, 500, 100)
    assert train.optimizer.name == "adamw" and train.optimizer.beta2 == 0.999
    assert spec.stage_names() == ["tokenizer", "pretrain", "eval"]
    assert spec.output_root == "runs/t"


def test_unknown_key_names_path_line_and_nearest_key():
    text = BASE.replace("max_steps: 10,", "max_step: 10,")
    (issue,) = issues_of(text)
    assert issue.path == "stages.pretrain.train.max_step"
    assert "did you mean 'max_steps'" in issue.message
    assert issue.line == text.splitlines().index(next(line for line in text.splitlines() if "max_step:" in line)) + 1


def test_unknown_optimizer_field_and_typo_word_match():
    issues = issues_of(with_changes(stages__pretrain__train={"lr_rate": 1, "optimizer": {"name": "adamw", "betta1": 0.9}}))
    msgs = {i.path: i.message for i in issues}
    assert "did you mean 'lr'" in msgs["stages.pretrain.train.lr_rate"]
    assert "did you mean 'beta1'" in msgs["stages.pretrain.train.optimizer.betta1"]


def test_names_from_other_tools_point_to_llmlabs_keys():
    issues = issues_of(with_changes(stages__pretrain__train={"learning_rate": 1e-3, "lerning_rate": 1e-3, "epochs": 3,
                                                             "max_grad_norm": 1.0, "warmup_ratio": 0.1},
                                    model__max_seq_length=64))
    msgs = {i.path: i.message for i in issues}
    assert "did you mean 'lr'?" in msgs["stages.pretrain.train.learning_rate"]
    assert "did you mean 'lr'?" in msgs["stages.pretrain.train.lerning_rate"]  # a typo of another tool's name
    assert "did you mean 'grad_clip'?" in msgs["stages.pretrain.train.max_grad_norm"]
    assert "set train.max_steps" in msgs["stages.pretrain.train.epochs"]
    assert "set warmup_steps" in msgs["stages.pretrain.train.warmup_ratio"]
    assert "did you mean 'max_seq_len'?" in msgs["model.max_seq_length"]


@pytest.mark.parametrize(
    "model, path, fragment",
    [
        ({"d_model": 65, "n_heads": 4, "n_kv_heads": 2}, "model.n_heads", "divisible by n_heads"),
        ({"d_model": 64, "n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads", "divisible by n_kv_heads"),
        ({"attention_type": "mqa", "n_heads": 4, "n_kv_heads": 2}, "model.n_kv_heads", "mqa means one KV head"),
        ({"attention_type": "mha", "n_heads": 4, "n_kv_heads": 2}, "model.n_kv_heads", "n_kv_heads: 4"),
        ({"dropout": 1.0}, "model.dropout", "less than 1"),
        ({"dropout": -0.1}, "model.dropout", "greater than or equal to 0"),
        ({"positional_encoding": "learned"}, "model.positional_encoding", "rope"),
        ({"d_model": 72, "n_heads": 8, "n_kv_heads": 2}, "model.n_heads", "even head size"),
    ],
)
def test_model_rules(model, path, fragment):
    raw = yaml.safe_load(BASE)
    raw["model"].update(model)
    issues = issues_of(yaml.safe_dump(raw, sort_keys=False))
    assert any(i.path == path and fragment in i.message for i in issues), issues


def test_mqa_and_mha_consistent_settings_pass():
    raw = yaml.safe_load(BASE)
    raw["model"].update({"attention_type": "mqa", "n_kv_heads": 1})
    parse_spec(yaml.safe_dump(raw, sort_keys=False))
    raw["model"].update({"attention_type": "mha", "n_kv_heads": 4})
    parse_spec(yaml.safe_dump(raw, sort_keys=False))


def test_weights_must_be_positive():
    issues = issues_of(with_changes(stages__pretrain__data=[{"path": "builtin:stdlib", "weight": 0}]))
    assert [i.path for i in issues] == ["stages.pretrain.data[0].weight"]


def test_graph_rules():
    raw = yaml.safe_load(BASE)
    raw["stages"]["eval"]["from"] = ["pretrian"]
    assert "did you mean 'pretrain'" in issues_of(yaml.safe_dump(raw, sort_keys=False))[0].message
    raw["stages"]["eval"]["from"] = "eval"
    assert "cycle" in issues_of(yaml.safe_dump(raw, sort_keys=False))[0].message
    # a later stage named in `from` would make a cycle possible: declaration order is the rule
    raw = yaml.safe_load(BASE)
    raw["stages"] = {"eval": raw["stages"]["eval"], "pretrain": raw["stages"]["pretrain"]}
    (issue,) = issues_of(yaml.safe_dump(raw, sort_keys=False))
    assert issue.path == "stages.eval.from" and "declared after" in issue.message


def test_unknown_stage_kind():
    issues = issues_of(with_changes(stages__x={"kind": "evl", "from": "pretrain"}))
    assert "did you mean 'eval'" in issues[0].message
    issues = issues_of(with_changes(stages__x={"kind": "gpro", "from": "pretrain"}))
    assert "did you mean 'grpo'" in issues[0].message


def test_tokenizer_needs_exactly_one_source():
    issues = issues_of(with_changes(tokenizer={"name": "gpt2", "path": "./tok"}))
    assert issues[0].path == "tokenizer" and "exactly one" in issues[0].message


def test_stop_at_without_an_evaluation_before_max_steps_is_refused():
    raw = yaml.safe_load(BASE)
    raw["stages"]["pretrain"]["train"].update({"stop_at": 2.5, "max_steps": 50, "eval_every": 100})
    (issue,) = issues_of(yaml.safe_dump(raw, sort_keys=False))
    assert issue.path == "stages.pretrain.train.stop_at" and "lower eval_every" in issue.message
    raw["stages"]["pretrain"]["train"]["eval_every"] = 25
    assert parse_spec(yaml.safe_dump(raw, sort_keys=False), "x.yaml").stages["pretrain"].train.stop_at == 2.5


def test_stop_at_on_a_stage_that_surely_has_no_held_out_data_is_refused_before_any_stage_runs():
    raw = yaml.safe_load(BASE)
    raw["stages"]["pretrain"]["train"].update({"stop_at": 2.5, "eval_every": 5})
    raw["stages"]["pretrain"]["val_fraction"] = 0
    (issue,) = issues_of(yaml.safe_dump(raw, sort_keys=False))  # a corpus: no validation split of its own
    assert issue.path == "stages.pretrain.train.stop_at" and "val_fraction" in issue.message
    raw["stages"]["pretrain"]["val_fraction"] = 0.01
    assert parse_spec(yaml.safe_dump(raw, sort_keys=False), "x.yaml").stages["pretrain"].train.stop_at == 2.5
    sft = {"kind": "sft", "from": "pretrain", "val_fraction": 0, "data": [{"path": "builtin:tasks"}],
           "train": {"max_steps": 10, "warmup_steps": 1, "eval_every": 5, "stop_at": 0.5}}
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"], "sft": sft}
    assert parse_spec(yaml.safe_dump(raw, sort_keys=False), "x.yaml")  # the task generator has a validation split
    sft["data"] = [{"path": "builtin:tasks", "split": "validation"}]  # read as training data: nothing held out
    (issue,) = issues_of(yaml.safe_dump(raw, sort_keys=False))
    assert issue.path == "stages.sft.train.stop_at"
    sft["data"] = [{"path": "some-org/some-dataset"}]  # a hub dataset may have one: left to the run
    assert parse_spec(yaml.safe_dump(raw, sort_keys=False), "x.yaml")


def test_min_improvement_without_save_best_only_is_refused():
    raw = yaml.safe_load(BASE)
    raw["stages"]["pretrain"]["train"].update({"min_improvement": 0.01, "save_best_only": False})
    (issue,) = issues_of(yaml.safe_dump(raw, sort_keys=False))
    assert issue.path == "stages.pretrain.train.min_improvement" and "save_best_only: true" in issue.message
    raw["stages"]["pretrain"]["train"]["save_best_only"] = True
    assert parse_spec(yaml.safe_dump(raw, sort_keys=False), "x.yaml").stages["pretrain"].train.min_improvement == 0.01


def test_every_error_reported_at_once():
    raw = yaml.safe_load(BASE)
    raw["model"].update({"d_model": 65, "dropout": 2.0, "colour": "red"})
    raw["stages"]["pretrain"]["train"]["warmup_steps"] = 99
    raw["stages"]["eval"]["from"] = "nope"
    paths = {i.path for i in issues_of(yaml.safe_dump(raw, sort_keys=False))}
    assert {"model.n_heads", "model.dropout", "model.colour", "stages.pretrain.train.warmup_steps", "stages.eval.from"} <= paths


def test_yaml_syntax_error_has_line():
    (issue,) = issues_of("name: t\nstages: [\n")
    assert "not valid YAML" in issue.message and issue.line is not None


def test_cli_validate_exit_codes_and_report(tmp_path):
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load(BASE)
    raw["model"]["n_kv_heads"] = 3
    raw["stages"]["pretrain"]["train"]["lrr"] = 1
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "2 problems" in out.stderr and "model.n_kv_heads" in out.stderr and "stages.pretrain.train.lrr" in out.stderr
    assert "Traceback" not in out.stderr
    good = subprocess.run([sys.executable, "-m", "llmlab.cli", "validate", str(ROOT / "pipelines/tiny.yaml")], capture_output=True, text=True)
    assert good.returncode == 0 and "valid" in good.stdout


def test_schema_is_json_schema_of_the_spec():
    schema = json_schema()
    assert set(schema["required"]) >= {"name", "stages"} and "tokenizer" in schema["properties"]
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "schema"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["title"] == "Pipeline"


def _properties(node, path=""):
    """(path, property schema) of every field of every block in a JSON Schema."""
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            yield f"{path}.{name}", prop
        for key, value in node.items():
            yield from _properties(value, f"{path}/{key}" if key != "properties" else path)
    elif isinstance(node, list):
        for item in node:
            yield from _properties(item, path)


def test_every_field_of_the_schema_has_a_description():
    fields = list(_properties(json_schema()))
    assert len(fields) > 150  # every block is in the schema, stages and optimizers included
    undocumented = [path for path, prop in fields if not prop.get("description")]
    assert not undocumented, undocumented


def test_docs_spec_md_is_generated_from_the_schema_and_up_to_date():
    from llmlab.spec.docs import spec_markdown

    text = spec_markdown()
    for path, prop in _properties(json_schema()):
        assert prop["description"].split()[0] in text
    assert "| `grpo`" not in text and "| `temperature` |" in text
    assert (ROOT / "docs" / "spec.md").read_text() == text, "docs/spec.md is stale: llmlab schema --markdown > docs/spec.md"


def test_validate_does_not_import_torch_or_prefect():
    code = "import sys, llmlab.cli; llmlab.cli.load_spec(sys.argv[1]); print('torch' in sys.modules, 'prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "pipelines/tiny.yaml")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_data_source_rules_catch_unknown_builtins_and_missing_local_files():
    issues = issues_of(with_changes(stages__pretrain__data=[{"path": "builtin:stdlb"}, {"path": "./nope/data.jsonl"}]))
    msgs = {i.path: i.message for i in issues}
    assert "did you mean 'builtin:stdlib'" in msgs["stages.pretrain.data[0].path"]
    assert "no such file" in msgs["stages.pretrain.data[1].path"]


def test_cli_inspect_prints_graph_params_and_memory():
    from llmlab.model import LlmlabConfig, count_parameters

    spec = load_spec(ROOT / "pipelines/tiny.yaml")
    expected = count_parameters(LlmlabConfig(**spec.model.model_dump(), vocab_size=spec.tokenizer.train.vocab_size))
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "inspect", str(ROOT / "pipelines/tiny.yaml")],
                         capture_output=True, text=True, check=True)
    assert f"parameters: {expected:,}" in out.stdout
    assert "pretrain" in out.stdout and "memory ~" in out.stdout and "rule of thumb" in out.stdout
    grpo, group = spec.stages["grpo"].train, spec.stages["grpo"].group_size  # RL counts prompts
    rollouts = -(-grpo.max_steps // (grpo.ppo_epochs * grpo.rollout_prompts // grpo.step_prompts))
    assert (f"{grpo.max_steps} updates of {grpo.step_prompts} prompts ({grpo.step_prompts * group} completions), "
            f"{rollouts} rollouts of {grpo.rollout_prompts} prompts ({grpo.rollout_prompts * group} completions)") in out.stdout
    dpo = spec.stages["dpo"].train
    assert f"x {dpo.batch_pairs * dpo.gradient_accumulation_steps} pairs ({2 * dpo.batch_pairs} sequences per forward pass)" in out.stdout
    from llmlab.estimate import describe
    from llmlab.runners.registry import estimate_stage

    lines = out.stdout.splitlines()
    for name in ("pretrain", "sft", "dpo", "grpo"):  # each training stage: llmlab.estimate's number
        line = next(line for line in lines if line.startswith(f"  {name} "))
        assert line.endswith(f"; {describe(estimate_stage(spec, name))}"), line


def test_sft_and_merge_rules():
    raw = yaml.safe_load(BASE)
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"],
                     "sft": {"kind": "sft", "from": "pretrain", "data": [{"path": "builtin:tasks"}]},
                     "merge": {"kind": "merge", "from": "sft"}}
    (issue,) = issues_of(yaml.safe_dump(raw, sort_keys=False))
    assert issue.path == "stages.merge.from" and "merge needs adapters" in issue.message and "without lora" in issue.message
    raw["stages"]["sft"]["lora"] = {"preset": "custom"}
    (issue,) = issues_of(yaml.safe_dump(raw, sort_keys=False))
    assert issue.path == "stages.sft.lora.target_modules"
    raw["stages"]["sft"]["lora"] = {"preset": "minimal", "r": 4}
    spec = parse_spec(yaml.safe_dump(raw, sort_keys=False))
    train = spec.stages["sft"].train  # sft's own defaults (fine-tuning a pretrained model)
    assert (train.lr, train.weight_decay, train.batch_sequences, train.gradient_accumulation_steps, train.warmup_steps,
            train.max_steps, train.eval_steps) == (5e-6, 0.01, 4, 16, 100, 5000, 50)
    raw["stages"]["sft"]["model"] = "./somewhere"
    assert "exactly one of `from`" in issues_of(yaml.safe_dump(raw, sort_keys=False))[0].message


def test_dpo_rules_and_seed_rlhf_defaults():
    raw = yaml.safe_load(BASE)
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"],
                     "dpo": {"kind": "dpo", "from": "pretrain", "data": [{"path": "builtin:tasks-preference"}],
                             "train": {"batch_size": 10, "mini_batch_size": 4, "gradient_accumulation_steps": 2}}}
    paths = {i.path: i.message for i in issues_of(yaml.safe_dump(raw, sort_keys=False))}
    # the old names, which counted pairs per step and per forward, name what replaced them
    assert "batch_pairs is pairs per forward pass" in paths["stages.dpo.train.batch_size"]
    assert "renamed to batch_pairs" in paths["stages.dpo.train.mini_batch_size"]
    assert "stages.dpo.train.gradient_accumulation_steps" not in paths  # a real setting now, not fixed at 1
    raw["stages"]["dpo"]["train"] = {}
    raw["stages"]["dpo"]["reference_stage"] = "later"
    assert "unknown stage 'later'" in issues_of(yaml.safe_dump(raw, sort_keys=False))[0].message
    raw["stages"]["dpo"]["reference_stage"] = "pretrain"
    spec = parse_spec(yaml.safe_dump(raw, sort_keys=False))
    dpo = spec.stages["dpo"]
    assert (dpo.beta, dpo.train.lr, dpo.train.weight_decay, dpo.train.grad_clip, dpo.train.batch_pairs,
            dpo.train.gradient_accumulation_steps) == (0.2, 1.4e-5, 0.0, 1.0, 32, 4)  # 128 pairs per step
    assert dpo.inputs == ["pretrain"] and dpo.start == "pretrain"


def rl_spec(**stages) -> str:
    raw = yaml.safe_load(BASE)
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"], **stages}
    return yaml.safe_dump(raw, sort_keys=False)


PROMPTS = [{"path": "builtin:tasks-prompts"}]
PAIRS = [{"path": "builtin:tasks-preference"}]


def test_ppo_and_grpo_have_the_seed_defaults():
    spec = parse_spec(rl_spec(ppo={"kind": "ppo", "from": "pretrain", "data": PROMPTS, "reward": "exact_match"},
                              grpo={"kind": "grpo", "from": "pretrain", "data": PROMPTS, "reward": "exact_match"}))
    ppo, grpo = spec.stages["ppo"], spec.stages["grpo"]
    assert (ppo.train.ppo_epochs, ppo.clip_range, ppo.vf_coef, ppo.gamma, ppo.gae_lambda, ppo.train.rollout_prompts,
            ppo.train.batch_prompts, ppo.max_new_tokens, ppo.temperature, ppo.top_k, ppo.top_p) == (
        4, 0.2, 0.1, 1.0, 0.95, 32, 8, 128, 1.0, 0, 1.0)
    assert (grpo.group_size, grpo.temperature) == (4, 1.0)
    assert ppo.start == "pretrain" and ppo.inputs == ["pretrain"]


def test_grpo_temperature_is_one_sentence_naming_temperature():
    old = {"kind": "grpo", "from": "pretrain", "data": PROMPTS, "reward": "exact_match", "grpo_temperature": 0.7}
    (issue,) = issues_of(rl_spec(grpo=old))
    assert issue.path == "stages.grpo.grpo_temperature" and "renamed to temperature" in issue.message


def test_rl_reward_rules():
    both = {"kind": "grpo", "from": "pretrain", "data": PROMPTS, "reward": "exact_match", "reward_stage": "rm"}
    (issue,) = issues_of(rl_spec(rm={"kind": "reward", "from": "pretrain", "data": PAIRS}, grpo=both))
    assert issue.path == "stages.grpo.reward" and "exactly one of `reward`" in issue.message
    neither = {"kind": "ppo", "from": "pretrain", "data": PROMPTS}
    assert "exactly one of `reward`" in issues_of(rl_spec(ppo=neither))[0].message
    wrong_kind = {"kind": "ppo", "from": "pretrain", "data": PROMPTS, "reward_stage": "pretrain"}
    (issue,) = issues_of(rl_spec(ppo=wrong_kind))
    assert issue.path == "stages.ppo.reward_stage" and "is a pretrain stage; name a stage of kind reward" in issue.message
    later = {"kind": "ppo", "from": "pretrain", "data": PROMPTS, "reward_stage": "rm"}
    (issue,) = issues_of(rl_spec(ppo=later, rm={"kind": "reward", "from": "pretrain", "data": PAIRS}))
    assert "declared after 'ppo'" in issue.message
    spec = parse_spec(rl_spec(rm={"kind": "reward", "from": "pretrain", "data": PAIRS}, ppo=later))
    assert spec.stages["ppo"].inputs == ["pretrain", "rm"] and spec.stages["ppo"].start == "pretrain"


def test_rl_batch_rules_and_a_reward_model_is_not_a_language_model():
    grpo = {"kind": "grpo", "from": "pretrain", "data": PROMPTS, "reward": "format", "group_size": 3,
            "train": {"rollout_prompts": 16, "batch_prompts": 6, "gradient_accumulation_steps": 4}}
    paths = {i.path: i.message for i in issues_of(rl_spec(grpo=grpo))}
    assert "must be a multiple of batch_prompts x gradient_accumulation_steps (6 x 4)" in paths["stages.grpo.train.rollout_prompts"]
    grpo["train"] = {"batch_size": 48, "mini_batch_size": 12}  # the old names counted completions
    paths = {i.path: i.message for i in issues_of(rl_spec(grpo=grpo))}
    assert "rollout_prompts is prompts per rollout" in paths["stages.grpo.train.batch_size"]
    assert "batch_prompts per forward pass" in paths["stages.grpo.train.mini_batch_size"]
    (issue,) = issues_of(rl_spec(rm={"kind": "reward", "from": "pretrain", "data": PAIRS},
                                 eval={"kind": "eval", "from": ["pretrain", "rm"], "data": [{"path": "builtin:stdlib"}]}))
    assert issue.path == "stages.eval.from" and "is a reward model" in issue.message


def test_distributed_block_rules():
    dist = {"nproc_per_node": 2, "strategy": "fsdp"}
    stages = {"sft": {"kind": "sft", "from": "pretrain", "data": [{"path": "builtin:tasks"}], "lora": {"r": 4},
                      "distributed": dist},
              "grpo": {"kind": "grpo", "from": "pretrain", "data": PROMPTS, "reward": "format", "distributed": dist},
              "more": {"kind": "pretrain", "from": "pretrain", "data": [{"path": "builtin:stdlib"}], "distributed": dist,
                       "train": {"warmup_steps": 1, "optimizer": {"name": "muon"}}}}
    paths = {i.path: i.message for i in issues_of(rl_spec(**stages))}
    assert "LoRA trains under ddp only" in paths["stages.sft.distributed.strategy"]
    assert "grpo runs under ddp only" in paths["stages.grpo.distributed.strategy"]
    assert "muon" in paths["stages.more.distributed.strategy"]
    ok = {"kind": "pretrain", "data": [{"path": "builtin:stdlib"}], "train": {"max_steps": 10, "warmup_steps": 1},
          "distributed": {"nproc_per_node": 4, "nnodes": 2}}
    spec = parse_spec(rl_spec(more=ok))
    d = spec.stages["more"].distributed
    assert (d.world_size, d.strategy, d.backend) == (8, "ddp", "auto")
    assert "Input should be 'ddp' or 'fsdp' (got 'zero3')" in issues_of(rl_spec(more={**ok, "distributed": {"strategy": "zero3"}}))[0].message


def test_sophia_is_refused_where_there_is_no_language_model_head_to_sample():
    sophia = {"max_steps": 10, "optimizer": {"name": "sophia"}}
    stages = {"rm": {"kind": "reward", "from": "pretrain", "data": PAIRS, "train": sophia},
              "ppo": {"kind": "ppo", "from": "pretrain", "data": PROMPTS, "reward": "format", "train": sophia},
              "grpo": {"kind": "grpo", "from": "pretrain", "data": PROMPTS, "reward": "format", "train": sophia}}
    paths = {i.path: i.message for i in issues_of(rl_spec(**stages))}
    assert "scalar head" in paths["stages.rm.train.optimizer.name"] and "stages.ppo.train.optimizer.name" in paths
    assert not any(p.startswith("stages.grpo") for p in paths)  # grpo's policy is a language model


def test_eval_scores_with_a_reward_stage_but_does_not_evaluate_it():
    ev = {"kind": "eval", "from": ["pretrain"], "data": [{"path": "builtin:stdlib"}], "reward_stage": "rm",
          "tasks": PROMPTS}
    spec = parse_spec(rl_spec(rm={"kind": "reward", "from": "pretrain", "data": PAIRS}, eval=ev))
    assert spec.stages["eval"].model_stages == ["pretrain"] and spec.stages["eval"].inputs == ["pretrain", "rm"]
    (issue,) = issues_of(rl_spec(rm={"kind": "reward", "from": "pretrain", "data": PAIRS}, eval={**ev, "reward": "format"}))
    assert issue.path == "stages.eval.reward" and "not both" in issue.message
    (issue,) = issues_of(rl_spec(eval={**ev, "reward_stage": "pretrain"}))
    assert "name a stage of kind reward" in issue.message


def test_eval_models_need_distinct_names_and_merge_takes_any_lora_stage():
    ev = {"kind": "eval", "from": ["pretrain"], "data": [{"path": "builtin:stdlib"}],
          "models": [{"name": "pretrain", "path": "./x"}, {"name": "base", "path": "Qwen/Qwen2.5-0.5B"}]}
    (issue,) = issues_of(rl_spec(eval=ev))
    assert issue.path == "stages.eval.models[0].name" and "names two of the evaluated models" in issue.message
    only_models = {**ev, "models": [{"name": "base", "path": "Qwen/Qwen2.5-0.5B"}]}
    del only_models["from"]
    spec = parse_spec(rl_spec(eval=only_models))
    assert spec.stages["eval"].model_stages == [] and spec.stages["eval"].models[0].path == "Qwen/Qwen2.5-0.5B"
    dpo = {"kind": "dpo", "from": "pretrain", "data": PAIRS, "lora": {"r": 4}}
    assert parse_spec(rl_spec(dpo=dpo, merge={"kind": "merge", "from": "dpo"})).stages["merge"].inputs == ["dpo"]
    (issue,) = issues_of(rl_spec(dpo={**dpo, "lora": None}, merge={"kind": "merge", "from": "dpo"}))
    assert "merge needs adapters" in issue.message and "dpo without lora" in issue.message


def test_the_real_model_pipeline_validates_and_inspects_offline(tmp_path):
    """pipelines/qwen.yaml names a hub model and hub datasets: offline, validate passes with notes
    on what it could not check, and inspect sizes the model from its published config (nothing is
    downloaded: HF_HUB_OFFLINE is set, and the hub cache is an empty folder)."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "validate", str(ROOT / "pipelines/qwen.yaml")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "hub model Qwen/Qwen2.5-0.5B-Instruct not checked (offline)" in out.stderr
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "inspect", str(ROOT / "pipelines/qwen.yaml")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "hub model Qwen/Qwen2.5-0.5B-Instruct (its published config): 494,032,768 parameters" in out.stdout
    assert out.stdout.count("memory ~") == 3  # sft, dpo, grpo
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_the_gpu_pipeline_trains_the_shape_bench_gpu_measures_within_a_card():
    """pipelines/gpu-152m.yaml's model is bench/gpu.py's training shape (so the two measure the same
    model), and every training stage's estimate fits an 80 GB card in fp32 (bf16 on the card takes less)."""
    import importlib.util

    from typer.testing import CliRunner

    from llmlab.cli import app

    spec = load_spec(ROOT / "pipelines/gpu-152m.yaml")
    gpu = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench/gpu.py")
    bench = importlib.util.module_from_spec(gpu)
    gpu.loader.exec_module(bench)
    m, full = spec.model, bench.FULL
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.max_seq_len, spec.tokenizer.train.vocab_size) == \
        (full["d_model"], full["n_layers"], full["n_heads"], full["n_heads"], full["d_ff"], full["seq"], full["vocab"])
    assert spec.stages["pretrain"].train.batch_sequences == full["batch"]
    out = CliRunner().invoke(app, ["inspect", str(ROOT / "pipelines/gpu-152m.yaml")])
    assert out.exit_code == 0 and "parameters: 151,898,880" in out.output, out.output
    estimates = [float(x) for x in re.findall(r"memory ~([0-9.]+) GiB", out.output)]
    assert len(estimates) == 3 and max(estimates) < 70, out.output


def test_dpo_takes_its_pairs_from_a_preferences_stage_and_grpo_dynamic_sampling_stays_on_one_process():
    prefs = {"kind": "preferences", "from": "pretrain", "data": PROMPTS, "reward": "exact_match"}
    spec = parse_spec(rl_spec(prefs=prefs, dpo={"kind": "dpo", "from": "prefs"}))
    assert spec.stages["dpo"].inputs == ["prefs"] and spec.stages["prefs"].samples_per_prompt >= 2
    (issue,) = issues_of(rl_spec(dpo={"kind": "dpo", "from": "pretrain"}))
    assert issue.path == "stages.dpo.data" and "start `from` a preferences stage" in issue.message
    grpo = {"kind": "grpo", "from": "pretrain", "data": PROMPTS, "reward": "exact_match", "dynamic_sampling": True,
            "distributed": {"nproc_per_node": 2}}
    paths = {i.path: i.message for i in issues_of(rl_spec(grpo=grpo))}
    assert any("dynamic_sampling" in p or "dynamic_sampling" in m for p, m in paths.items()), paths


def test_a_stage_cannot_start_from_lora_adapters_without_a_merge():
    raw = yaml.safe_load((ROOT / "pipelines/tiny-ppo.yaml").read_text())
    raw["stages"]["reward"]["from"] = "sft"  # sft trains LoRA adapters in this pipeline
    with pytest.raises(SpecError) as err:
        parse_spec(yaml.safe_dump(raw, sort_keys=False))
    (issue,) = err.value.issues
    assert issue.path == "stages.reward.from" and "'sft' trains LoRA adapters" in issue.message
    assert "kind: merge, from: sft" in issue.message


def test_a_spec_that_starts_from_a_model_needs_no_tokenizer_block_and_one_from_scratch_says_so():
    from llmlab.spec import parse_spec

    spec = parse_spec("name: byo\nstages:\n  sft: {kind: sft, model: some/model, data: [{path: builtin:tasks}]}\n")
    assert spec.tokenizer is None and not spec.trains_tokenizer and spec.stage_names() == ["sft"]
    (issue,) = issues_of("name: scratch\nstages:\n  pretrain: {kind: pretrain, data: [{path: builtin:stdlib}]}\n")
    assert issue.path == "tokenizer" and "stage 'pretrain' trains a model from scratch" in issue.message
    assert "tokenizer: {train:" in issue.message


def test_defaults_fit_a_short_run_and_only_written_values_are_errors():
    from llmlab.spec import SftTrain

    short = SftTrain(max_steps=5, stop_at=0.5)  # warmup (default 100s) and eval_every (500) were not written
    assert short.warmup_steps == 0 and short.eval_every == 5 and not list(short.rules())
    assert SftTrain(max_steps=50).warmup_steps == 5
    (issue,) = issues_of(with_changes(stages__pretrain__train={"max_steps": 5, "warmup_steps": 7}))
    assert issue.path == "stages.pretrain.train.warmup_steps" and "warmup_steps (7) exceeds max_steps (5)" in issue.message
