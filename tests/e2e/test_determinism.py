"""Same spec, same seed, same machine: the same numbers. Every stage kind, started both `from:` an
upstream stage and from a `model:` folder (a stock transformers Llama), runs twice through
`llmlab run` in fresh processes; every logged metric but timings must be equal, and so must the
files a stage writes whose content is data (preference pairs, the eval report's numbers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TOY_REWARDS, cli_env

pytestmark = pytest.mark.slow

TIMING = ("per_sec", "seconds", "time", "elapsed", "generation_share")  # wall-clock measures


def llama_folder(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmlab.tokenizer import train_tokenizer

    texts = [f"{i}+1={i + 1} rev a b c sort 321 max 4 good answer" for i in range(300)]
    tok = train_tokenizer(texts, 330, root)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                 num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=96,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(root)
    return root


def steps(n: int = 4, **extra) -> dict:
    return {"max_steps": n, "warmup_steps": 1, "eval_every": 2, "eval_steps": 2, "save_every": 2, "log_every": 1, **extra}


def rl(kind: str, start: dict, **extra) -> dict:
    group = 4 if kind == "grpo" else 1
    stage = {"kind": kind, **start, "data": [{"path": "builtin:tasks-prompts"}], "max_new_tokens": 6, "eval_prompts": 8,
             "max_prompts": 64, "train": steps(2, rollout_prompts=16 // group, batch_prompts=8 // group, eval_steps=1), **extra}
    if kind == "grpo":
        stage["group_size"] = 4
    return stage


def spec(tmp: Path, llama: Path, corpus: Path) -> dict:
    model = {"model": str(llama)}
    lora = {"preset": "all", "r": 4, "dropout": 0.1}  # dropout draws random masks: they must be seeded too
    sft_data = {"data": [{"path": "builtin:tasks"}], "max_examples": 64}
    pairs = {"data": [{"path": "builtin:tasks-preference"}], "max_examples": 32}
    return {
        "name": "determinism", "seed": 7, "workdir": str(tmp / "runs"),
        "tokenizer": {"train": {"vocab_size": 400, "data": [{"path": str(corpus)}]}},
        "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_seq_len": 64, "dropout": 0.1},
        "stages": {
            "pretrain": {"kind": "pretrain", "data": [{"path": str(corpus)}], "val_fraction": 0.1,
                         "train": steps(4, batch_sequences=4)},
            "sft": {"kind": "sft", "from": "pretrain", **sft_data, "lora": lora, "train": steps(batch_sequences=4)},
            "merge": {"kind": "merge", "from": "sft"},
            "dpo": {"kind": "dpo", "from": "merge", **pairs, "train": steps(batch_pairs=4)},
            "prefs": {"kind": "preferences", "from": "dpo", "data": [{"path": "builtin:tasks-prompts"}],
                      "reward": "toy_rewards:readable", "max_prompts": 16, "samples_per_prompt": 3, "max_new_tokens": 6},
            "dpo_on_policy": {"kind": "dpo", "from": "prefs", "train": steps(2, batch_pairs=4)},
            "grpo": rl("grpo", {"from": "dpo"}, reward="toy_rewards:readable"),
            "sft_model": {"kind": "sft", **model, **sft_data, "train": steps(batch_sequences=4)},
            "dpo_model": {"kind": "dpo", **model, **pairs, "lora": lora, "train": steps(batch_pairs=4)},
            "rm": {"kind": "reward", **model, **pairs, "train": steps(batch_pairs=4)},
            "ppo_model": rl("ppo", model, reward_stage="rm", lora={"preset": "all", "r": 4}),
            "grpo_model": rl("grpo", model, reward="toy_rewards:readable"),
            "prefs_model": {"kind": "preferences", **model, "data": [{"path": "builtin:tasks-prompts"}],
                            "reward": "toy_rewards:readable", "max_prompts": 16, "samples_per_prompt": 3, "max_new_tokens": 6},
            "export": {"kind": "export", "from": "merge"},
            "eval": {"kind": "eval", "from": ["pretrain", "merge", "grpo"], "data": [{"path": str(corpus)}],
                     "val_fraction": 0.1, "batches": 2, "batch_sequences": 4, "max_new_tokens": 6,
                     "tasks": [{"path": "builtin:tasks-prompts", "split": "test"}], "tasks_limit": 8,
                     "preferences": [{"path": "builtin:tasks-preference", "split": "test"}], "preferences_limit": 8},
        },
    }


def numbers(runs: Path) -> dict:
    """Every stage's logged metrics (timings left out), its final metrics, and the data files it wrote."""
    out = {}
    for stage_dir in sorted(p for p in runs.iterdir() if (p / "stage.json").exists()):
        record = json.loads((stage_dir / "stage.json").read_text())
        assert record["status"] == "finished", (stage_dir.name, record.get("error"))
        rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()] \
            if (stage_dir / "metrics.jsonl").exists() else []
        drop = lambda d: {k: v for k, v in d.items() if not any(t in k for t in TIMING)}  # noqa: E731
        out[stage_dir.name] = {"logged": [drop(r) for r in rows], "final": drop(record.get("metrics", {}))}
        if (stage_dir / "pairs" / "pairs.jsonl").exists():
            out[stage_dir.name]["pairs"] = (stage_dir / "pairs" / "pairs.jsonl").read_text()
        if (stage_dir / "results.json").exists():
            results = json.loads((stage_dir / "results.json").read_text())
            out[stage_dir.name]["results"] = {m: drop(v) for m, v in results["models"].items()}
    return out


def test_every_stage_kind_gives_the_same_numbers_twice_from_a_stage_and_from_a_model_folder(tmp_path, api_url):
    llama = llama_folder(tmp_path / "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: the value {i} returns {i * 7 % 13} when sorted and reversed."
                                  for i in range(400)))
    (tmp_path / "toy_rewards.py").write_text(TOY_REWARDS)
    runs = {}
    for attempt in ("a", "b"):  # both at once: two fresh processes, the same environment
        work = tmp_path / attempt
        work.mkdir()
        (work / "toy_rewards.py").write_text(TOY_REWARDS)
        path = work / "determinism.yaml"
        path.write_text(yaml.safe_dump(spec(work, llama, corpus), sort_keys=False))
        # one thread each: two runs side by side on two cores, neither waiting on the other's threads
        env = cli_env(work / "state", api_url, PYTHONPATH=str(work) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                      OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        runs[attempt] = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "run", str(path)], cwd=work, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    got = []
    for attempt, proc in runs.items():
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out[-5000:]
        got.append(numbers(tmp_path / attempt / "runs"))
    first, second = got
    kinds = {json.loads((tmp_path / "a" / "runs" / s / "stage.json").read_text())["kind"] for s in first}
    assert kinds == {"tokenizer", "pretrain", "sft", "merge", "dpo", "preferences", "grpo", "ppo", "reward", "export", "eval"}
    for stage in first:
        losses = [r for r in first[stage]["logged"] if any("loss" in k for k in r)]
        assert stage in ("tokenizer", "merge", "export", "eval", "prefs", "prefs_model") or losses, stage
        assert first[stage] == second[stage], f"stage '{stage}' gave different numbers in two identical runs"
