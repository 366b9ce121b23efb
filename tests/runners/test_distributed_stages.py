"""Stages with `distributed:` run under torchrun from execute_stage (2 CPU processes, gloo): rank 0
alone writes outputs and MLflow metrics; pretrain equals its single-process twin with the same
global batch; LoRA SFT, DPO, GRPO and LoRA PPO (rollouts per rank) run under DDP; a failing rank's
error reaches the caller."""

import json

import pytest
import torch
import yaml
from helpers import TOY_REWARDS  # a reward with spread, so every update moves the loss

from llmlab.model import LlmlabConfig, build_model
from llmlab.execute import execute_stage
from llmlab.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow
DDP2 = {"nproc_per_node": 2, "strategy": "ddp", "backend": "gloo"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-base")
    texts = [f"{i}+1={i + 1} rev a b c sort 321 good bad answer is the end" for i in range(300)]
    tok = train_tokenizer(texts, 330, root)
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok), max_seq_len=64,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    build_model(cfg, seed=0).save_pretrained(root)
    (root / "corpus.txt").write_text("\n\n".join(f"document {i}: " + " ".join(texts[i:i + 20]) for i in range(200)))
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    return tmp_path


def run(project, base, name, stage, sub="runs"):
    spec = {"name": "dist-test", "workdir": str(project / sub), "tokenizer": {"path": str(base)},
            "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_seq_len": 64},
            "stages": {name: stage}}
    path = project / f"{sub}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = execute_stage(str(path), name, {}, None)
    rows = [json.loads(line) for line in (project / sub / name / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def pretrain(base, distributed=None, accumulation=2):
    stage = {"kind": "pretrain", "data": [{"path": str(base / "corpus.txt")}], "val_fraction": 0.1,
             "train": {"max_steps": 4, "lr": 3e-3, "warmup_steps": 1, "batch_sequences": 2,
                       "gradient_accumulation_steps": accumulation, "eval_every": 2, "eval_steps": 2, "save_every": 2,
                       "log_every": 1}}
    if distributed:
        stage["distributed"] = distributed
    return stage


def test_ddp_pretrain_stage_equals_one_process_and_logs_once(project, base, capfd):
    single, single_rows = run(project, base, "pretrain", pretrain(base), "single")
    two, rows = run(project, base, "pretrain", pretrain(base, DDP2, accumulation=1), "two")
    out = capfd.readouterr().out
    assert "launching 2 processes (ddp)" in out and "x world size 2 = 4" in out
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # rank 0 alone wrote metrics.jsonl
    assert losses == pytest.approx([r["train/loss"] for r in single_rows if "train/loss" in r], abs=1e-5)
    assert two["metrics"]["eval/loss"] == pytest.approx(single["metrics"]["eval/loss"], abs=1e-5)
    assert (project / "two" / "pretrain" / "model" / "model.safetensors").is_file()
    record = json.loads((project / "two" / "pretrain" / "stage.json").read_text())
    assert record["status"] == "finished" and record["fingerprint"] == two["fingerprint"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'state' / 'mlflow.db'}")
    history = client.get_metric_history(two["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # logged once per step, by rank 0
    assert client.get_run(two["mlflow_run_id"]).data.tags["llmlab.world_size"] == "2"
    assert not list((project / "two" / "pretrain").glob(".torchrun-*"))


def test_lora_sft_dpo_grpo_and_lora_ppo_run_under_ddp(project, base):
    sft = {"kind": "sft", "model": str(base), "data": [{"path": "builtin:tasks"}], "max_examples": 64,
           "lora": {"preset": "all", "r": 4}, "distributed": DDP2,
           "train": {"max_steps": 2, "lr": 1e-3, "warmup_steps": 0, "batch_sequences": 4, "gradient_accumulation_steps": 1,
                     "eval_every": 2, "eval_steps": 1, "save_every": 2, "log_every": 1}}
    result, rows = run(project, base, "sft", sft)
    assert (project / "runs" / "sft" / "adapters" / "best" / "adapter_config.json").is_file()
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]

    dpo = {"kind": "dpo", "model": str(base), "data": [{"path": "builtin:tasks-preference"}], "max_examples": 32,
           "distributed": DDP2, "train": {"max_steps": 2, "lr": 1e-3, "batch_pairs": 4, "gradient_accumulation_steps": 2,
                                          "eval_every": 2, "eval_steps": 1, "save_every": 2, "log_every": 1}}
    result, rows = run(project, base, "dpo", dpo)
    first = next(r for r in rows if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1, on both ranks

    grpo = {"kind": "grpo", "model": str(base), "data": [{"path": "builtin:tasks-prompts"}], "reward": "format",
            "group_size": 4, "max_new_tokens": 4, "eval_prompts": 8, "max_prompts": 64, "distributed": DDP2,
            "train": {"max_steps": 2, "lr": 1e-3, "rollout_prompts": 4, "batch_prompts": 1, "ppo_epochs": 1,
                      "eval_every": 2, "save_every": 2, "log_every": 1}}
    result, rows = run(project, base, "grpo", grpo)
    first = next(r for r in rows if "train/loss" in r)
    assert first["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and "rl/zero_variance_share" in first
    assert (project / "runs" / "grpo" / "model" / "model.safetensors").is_file()

    ppo = {**grpo, "kind": "ppo", "lora": {"preset": "all", "r": 4}, "target_kl": 0.01,
           "train": {**grpo["train"], "rollout_prompts": 16, "batch_prompts": 4}}
    del ppo["group_size"]
    result, rows = run(project, base, "ppo", ppo)
    first = next(r for r in rows if "train/loss" in r)
    assert first["rl/kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA reference = adapters disabled, on every rank
    assert "rl/value_loss" in first and "rl/explained_variance" in first
    assert (project / "runs" / "ppo" / "adapters" / "best" / "adapter_config.json").is_file()


def test_a_failing_rank_fails_the_stage_with_its_error(project, base):
    (project / "short.txt").write_text("too short to cut one block from")
    stage = pretrain(base, DDP2, accumulation=1)
    stage["data"] = [{"path": str(project / "short.txt")}]
    with pytest.raises(RuntimeError) as err:
        run(project, base, "pretrain", stage)
    assert "failed under torchrun" in str(err.value) and "add data or lower val_fraction" in str(err.value)
    record = json.loads((project / "runs" / "pretrain" / "stage.json").read_text())
    assert record["status"] == "failed"


def test_ctrl_c_stops_every_rank_at_a_checkpoint_and_the_rerun_resumes(project, base):
    import os
    import signal
    import subprocess
    import sys
    import time

    stage = pretrain(base, DDP2, accumulation=1)
    stage["train"].update(max_steps=400, save_every=5, eval_every=1000, log_every=5, warmup_steps=0)
    spec = {"name": "dist-test", "workdir": str(project / "runs"), "tokenizer": {"path": str(base)},
            "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_seq_len": 64},
            "stages": {"pretrain": stage}}
    (project / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    code = "from llmlab.execute import execute_stage; execute_stage('s.yaml', 'pretrain', {}, None)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = project / "runs" / "pretrain" / "checkpoints"
    deadline = time.time() + 180
    while not (ckpt.is_dir() and any(d.name.startswith("step-") for d in ckpt.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C in the terminal does: the launcher, torchrun, workers
    out, _ = proc.communicate(timeout=180)
    record = json.loads((project / "runs" / "pretrain" / "stage.json").read_text())
    assert record["status"] == "interrupted", out[-3000:]
    saved = max(int(d.name.split("-")[-1]) for d in ckpt.iterdir() if d.name.startswith("step-"))
    assert 0 < saved < 400
    result, rows = run(project, base, "pretrain", stage)
    assert result["status"] == "finished" and result["metrics"]["train/steps"] == 400
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(5, 401, 5))  # nothing lost, nothing logged twice


def test_a_two_process_grpo_stage_resumes_mid_rollout_exactly(project, base):
    """Each rank's pending mini-batches are its own: the checkpoint gathers them and each rank gets
    its own back, so 3 steps + resume to 6 equals 6 straight (4 updates per rollout)."""
    (project / "toy_rewards.py").write_text(TOY_REWARDS)  # the workers import it from the project folder

    def grpo(steps):
        return {"kind": "grpo", "model": str(base), "data": [{"path": "builtin:tasks-prompts"}],
                "reward": "toy_rewards:readable",
                "group_size": 4, "max_new_tokens": 4, "eval_prompts": 4, "max_prompts": 64, "distributed": DDP2,
                "train": {"max_steps": steps, "lr": 1e-2, "scheduler": "none", "warmup_steps": 0, "rollout_prompts": 4,
                          "batch_prompts": 1, "ppo_epochs": 2, "eval_every": 100, "save_every": 3, "log_every": 1}}

    _, straight = run(project, base, "grpo", grpo(6), "a")
    run(project, base, "grpo", grpo(3), "b")
    _, resumed = run(project, base, "grpo", grpo(6), "b")

    def series(rows, key):
        return [r[key] for r in rows if "train/loss" in r]

    assert series(resumed, "step") == series(straight, "step") == [1, 2, 3, 4, 5, 6]
    assert min(abs(x) for x in series(straight, "train/loss")[3:]) > 1e-4  # losses that would show a wrong batch
    for key in ("train/loss", "rl/reward_mean", "rl/ratio_mean"):
        assert series(resumed, key) == pytest.approx(series(straight, key), abs=1e-6), key
