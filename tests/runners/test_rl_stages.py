"""The reward, grpo and ppo stages on a tiny model: a reward model separates separable pairs, both RL
stages raise the reward of a toy task in a few steps, LoRA uses the adapter-free model as the KL
reference, PPO (with LoRA) runs against a reward stage by name, and a stage resumes exactly."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TOY_REWARDS

from llmlab.model import LlmlabConfig, build_model
from llmlab.rewards import load_reward
from llmlab.execute import execute_stage
from llmlab.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-base")
    texts = [f"{i}+1={i + 1} rev a b c sort 321 good bad answer is" for i in range(300)]
    tok = train_tokenizer(texts, 330, root)
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok), max_seq_len=64,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    build_model(cfg, seed=0).save_pretrained(root)
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy_rewards.py").write_text(TOY_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_rewards", None)
    torch.set_num_threads(1)
    return tmp_path


def run(project, base, stages: dict, name: str, inputs: dict | None = None):
    project.mkdir(parents=True, exist_ok=True)
    spec = {"name": "rl-test", "workdir": str(project / "runs"), "tokenizer": {"path": str(base)}, "stages": stages}
    (project / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = execute_stage(str(project / "s.yaml"), name, inputs or {}, None)
    rows = [json.loads(line) for line in (project / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def rl_stage(kind, base, **changes):
    group = 4 if kind == "grpo" else 1  # 32 completions per rollout, 16 per step either way
    stage = {"kind": kind, "model": str(base), "data": [{"path": "builtin:tasks-prompts"}], "reward": "toy_rewards:readable",
             "max_new_tokens": 6, "eval_prompts": 16, "max_prompts": 400,
             "train": {"max_steps": 24, "lr": 2e-2, "scheduler": "none", "rollout_prompts": 32 // group,
                       "batch_prompts": 16 // group, "ppo_epochs": 2, "eval_every": 12, "save_every": 12, "log_every": 2}}
    if kind == "grpo":
        stage["group_size"] = 4
    stage.update(changes)
    return stage


def mean(rows, key, part):
    values = [r[key] for r in rows if key in r]
    k = max(len(values) // 4, 1)
    return sum(values[:k] if part == "first" else values[-k:]) / k


def test_reward_stage_separates_separable_pairs(project, base):
    pairs = [{"prompt": f"item {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(400)]
    (project / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    stage = {"kind": "reward", "model": str(base), "data": [{"path": "pairs.jsonl"}], "val_fraction": 0.1,
             "train": {"max_steps": 30, "lr": 3e-3, "batch_pairs": 8, "gradient_accumulation_steps": 2, "eval_every": 15,
                       "eval_steps": 5, "save_every": 15, "log_every": 5}}
    result, rows = run(project, base, {"rm": stage}, "rm")
    assert result["metrics"]["eval/accuracy"] >= 0.95
    assert {"reward/accuracy", "reward/margin"} <= set(next(r for r in rows if "train/loss" in r))
    assert rows[0]["data/train_examples"] > 300 and rows[0]["data/malformed_rows"] == 0  # what the data gave
    # the output is a sequence-classification model that the rewards loader scores with
    rm = load_reward(result["outputs"]["model"])
    tok = rm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "item 999"}], tokenize=False, add_generation_prompt=True)
    good, bad = rm([prompt, prompt], ["good answer 999<|im_end|>", "bad answer 999<|im_end|>"])
    assert good > bad


def test_grpo_stage_raises_the_reward_and_logs_every_metric(project, base):
    result, rows = run(project, base, {"grpo": rl_stage("grpo", base)}, "grpo")
    assert mean(rows, "rl/reward_mean", "last") > mean(rows, "rl/reward_mean", "first") + 0.1
    logged = set().union(*rows)
    assert {"rl/reward_mean", "rl/reward_std", "rl/kl", "rl/entropy", "rl/clip_fraction", "rl/approx_kl",
            "rl/group_reward_std", "rl/zero_variance_share", "rl/best_of_n", "rl/rollout_tokens_per_sec",
            "rl/generation_share", "eval/reward_mean", "eval/exact_match"} <= logged
    assert all(0 < r["rl/generation_share"] <= 1 for r in rows if "rl/generation_share" in r)
    # the starting model is evaluated too (eval_at_start, on by default for RL): the curve starts at its score
    assert [r["step"] for r in rows if "eval/reward_mean" in r] == [0, 12, 24]
    assert (project / "runs" / "grpo" / "model" / "model.safetensors").is_file()
    assert result["metrics"]["train/steps"] == 24


def test_ppo_stage_raises_the_reward_with_a_value_head(project, base):
    stage = rl_stage("ppo", base, kl_coef=0.01, vf_coef=0.5, target_kl=1e-4)  # adaptive: KL is above target
    result, rows = run(project, base, {"ppo": stage}, "ppo")
    assert mean(rows, "rl/reward_mean", "last") > mean(rows, "rl/reward_mean", "first") + 0.1
    logged = set().union(*rows)
    assert {"rl/value_loss", "rl/explained_variance", "rl/kl", "rl/kl_coef", "rl/clip_fraction", "rl/approx_kl",
            "rl/entropy", "rl/rollout_tokens_per_sec", "rl/generation_share"} <= logged
    coefs = [r["rl/kl_coef"] for r in rows if "rl/kl_coef" in r]
    assert coefs[0] == pytest.approx(0.01) and coefs[-1] > coefs[0]  # the coefficient adapted upward
    head = torch.load(result["outputs"]["value_head"], weights_only=True)
    assert head["weight"].abs().sum() > 0  # the value head learned (it starts at zero)
    best = torch.load(project / "runs" / "ppo" / "checkpoints" / "best-policy" / "value_head.pt", weights_only=True)
    assert torch.equal(head["weight"], best["weight"])  # the head of the exported (best) policy, not the last one
    assert (project / "runs" / "ppo" / "model" / "model.safetensors").is_file()


def test_plan_inspect_and_the_runner_agree_on_a_ppo_stages_rollouts(project, base):
    """ppo_epochs 4: each rollout of 8 prompts gives 4 x 8 / 4 = 8 updates of 4 prompts, so 20 steps
    take 3 rollouts; plan, inspect and the runner count them the same way (not 8 // 4 = 2 per rollout)."""
    from llmlab.cli import app
    from llmlab.plan import stage_work
    from llmlab.spec import load_spec
    from typer.testing import CliRunner

    stage = rl_stage("ppo", base, train={"max_steps": 20, "lr": 1e-3, "scheduler": "none", "rollout_prompts": 8,
                                         "batch_prompts": 4, "ppo_epochs": 4, "eval_every": 20, "save_every": 20,
                                         "log_every": 5})
    result, rows = run(project, base, {"ppo": stage}, "ppo")
    spec = load_spec(project / "s.yaml")
    train = spec.stages["ppo"].train
    assert train.steps_per_rollout() == 8 and train.rollouts() == 3
    assert result["metrics"]["rl/rollouts"] == 3  # what the runner sampled
    assert stage_work(spec, "ppo").rollouts == 3  # what plan's time estimate counts
    shown = CliRunner().invoke(app, ["inspect", str(project / "s.yaml")]).output
    assert "20 updates of 4 prompts (4 completions), 3 rollouts of 8 prompts (8 completions), 8 updates each" in shown


def test_lora_grpo_uses_the_adapter_free_model_as_reference(project, base):
    from mlflow.tracking import MlflowClient

    stage = rl_stage("grpo", base, lora={"preset": "all", "r": 4, "dropout": 0.1},
                     train={"max_steps": 4, "lr": 1e-3, "rollout_prompts": 4, "batch_prompts": 2, "ppo_epochs": 1,
                            "eval_every": 4, "save_every": 4, "log_every": 1})
    result, rows = run(project, base, {"grpo": stage}, "grpo")
    client = MlflowClient(f"sqlite:///{project / 'state' / 'mlflow.db'}")
    assert client.get_run(result["mlflow_run_id"]).data.tags["llmlab.reference"] == "the same model with adapters disabled"
    assert (project / "runs" / "grpo" / "adapters" / "best" / "adapter_config.json").is_file()
    # adapters start at zero, dropout is off: the first rollout's policy is the reference
    first = next(r for r in rows if "train/loss" in r)
    assert first["rl/kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_ppo_scores_with_a_reward_stage_named_in_the_spec(project, base):
    pairs = [{"prompt": "x", "chosen": "1 2 3", "rejected": "a b c"}] * 40
    (project / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    stages = {"rm": {"kind": "reward", "model": str(base), "data": [{"path": "pairs.jsonl"}],
                     "train": {"max_steps": 2, "batch_pairs": 8, "gradient_accumulation_steps": 1, "eval_every": 2, "eval_steps": 1,
                               "save_every": 2}},
              "ppo": rl_stage("ppo", base, reward=None, reward_stage="rm", lora={"preset": "all", "r": 4},
                              train={"max_steps": 2, "rollout_prompts": 8, "batch_prompts": 8, "ppo_epochs": 1,
                                     "eval_every": 2, "save_every": 2, "log_every": 1})}
    rm, _ = run(project, base, stages, "rm")
    result, rows = run(project, base, stages, "ppo", inputs={"rm": rm})
    first = next(r for r in rows if "train/loss" in r)
    assert "rl/value_loss" in first and result["metrics"]["train/steps"] == 2
    assert first["rl/kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA: the reference is the adapter-free policy
    assert (project / "runs" / "ppo" / "adapters" / "best" / "adapter_config.json").is_file()


def test_an_interrupted_grpo_stage_resumes_with_the_same_rollouts_and_losses(project, base):
    """Run 6 steps straight (4 per rollout: steps 5-6 use a second rollout); then 3 steps and (the
    same config, a longer horizon) resume to 6: the checkpoint carries the rollout queue, the prompt
    cursor and the RNG, so steps 4-6 match."""
    def stage(steps):
        return rl_stage("grpo", base, train={"max_steps": steps, "lr": 1e-2, "scheduler": "none", "rollout_prompts": 4,
                                              "batch_prompts": 2, "ppo_epochs": 2, "eval_every": 100,
                                              "save_every": 3, "log_every": 1})

    _, straight = run(project / "a", base, {"grpo": stage(6)}, "grpo")
    run(project / "b", base, {"grpo": stage(3)}, "grpo")
    resumed, rows = run(project / "b", base, {"grpo": stage(6)}, "grpo")

    def series(rs, key):
        return [r[key] for r in rs if "train/loss" in r]

    assert series(rows, "step") == series(straight, "step") == [1, 2, 3, 4, 5, 6]
    assert series(rows, "rl/reward_mean")[4] != series(rows, "rl/reward_mean")[3]  # a second rollout was drawn
    for key in ("train/loss", "rl/reward_mean", "rl/kl"):
        assert series(rows, key) == pytest.approx(series(straight, key), abs=1e-6), key


@pytest.mark.parametrize("optimizer", [{"name": "sophia", "k": 2}, {"name": "lion"}])
def test_grpo_trains_with_other_optimizers(project, base, optimizer):
    stage = rl_stage("grpo", base, train={"max_steps": 4, "lr": 1e-4, "rollout_prompts": 4, "batch_prompts": 2,
                                          "ppo_epochs": 1, "eval_every": 4, "save_every": 4, "log_every": 1,
                                          "optimizer": optimizer})
    result, rows = run(project, base, {"grpo": stage}, "grpo")
    assert result["metrics"]["train/steps"] == 4
    assert all(r["train/grad_norm"] > 0 for r in rows if "train/loss" in r)


def test_a_preferences_stage_writes_on_policy_pairs_that_a_dpo_stage_trains_on(project, base):
    stages = {"prefs": {"kind": "preferences", "model": str(base), "data": [{"path": "builtin:tasks-prompts"}],
                        "reward": "toy_rewards:readable", "samples_per_prompt": 4, "max_prompts": 24, "max_new_tokens": 6,
                        "batch_prompts": 8},
              "dpo": {"kind": "dpo", "from": "prefs", "val_fraction": 0.2,
                      "train": {"max_steps": 2, "lr": 1e-4, "batch_pairs": 4, "gradient_accumulation_steps": 1,
                                "eval_every": 2, "eval_steps": 1, "save_every": 2, "log_every": 1}}}
    prefs, rows = run(project, base, stages, "prefs")
    pairs = [json.loads(line) for line in (Path(prefs["outputs"]["pairs"]) / "pairs.jsonl").read_text().splitlines()]
    assert 0 < len(pairs) <= 24 and prefs["metrics"]["preferences/pairs"] == len(pairs)
    for pair in pairs:  # the best of each prompt's samples chosen over its worst
        assert pair["chosen_score"] > pair["rejected_score"] and pair["chosen"] != pair["rejected"]
        assert pair["prompt"][-1]["role"] == "user" and "answer" in pair
    assert prefs["outputs"]["model"] == str(base)  # the model passes through: dpo trains the one that sampled
    dpo, dpo_rows = run(project, base, stages, "dpo", inputs={"prefs": prefs})
    train, val = dpo_rows[0]["data/train_examples"], dpo_rows[0]["data/val_examples"]
    # the pairs file is what dpo reads: its held-out side (by prompt hash) gives the 4 pairs evaluated
    # (eval_steps x batch_pairs) and is never trained on, the rest trains
    assert train >= len(pairs) / 2 and val == 4 and train + val <= len(pairs)
    assert dpo["metrics"]["train/steps"] == 2
    record = json.loads((project / "runs" / "dpo" / "stage.json").read_text())
    assert record["inputs"] == {"prefs": prefs["fingerprint"]}
