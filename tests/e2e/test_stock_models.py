"""Stock transformers models through a whole pipeline, offline: tiny random Llama and Qwen2 folders
(saved with a tokenizer, as a user's checkpoint would be) go through sft (LoRA, default options) ->
merge -> dpo -> grpo -> eval with tasks -> export, then `llmlab chat` answers once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmlab.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow


def texts():
    from itertools import islice

    from llmlab.data.sources import iter_texts

    return list(islice(iter_texts("builtin:stdlib"), 1500))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts(), 512, folder)
    return folder


def stock_folder(family: str, tokenizer_dir: Path, root: Path) -> Path:
    """A tiny random stock model of `family` with the tokenizer saved beside it."""
    import transformers as tf

    from llmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    cfg = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
               vocab_size=len(tok), max_position_embeddings=64, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = {"llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)),
             "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**cfg))}[family]()
    folder = root / family
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def spec_for(folder: Path, root: Path, name: str) -> Path:
    steps = {"eval_every": 2, "save_every": 2, "log_every": 1, "warmup_steps": 0, "max_steps": 2}
    spec = {
        "name": name, "workdir": str(root / "runs"),  # no tokenizer block: every stage uses the model's own
        "stages": {
            "sft": {"kind": "sft", "model": str(folder), "data": [{"path": "builtin:tasks"}], "max_examples": 64,
                    "lora": {"r": 4},  # the default options: preset minimal, train_special_tokens true
                    "train": {**steps, "lr": 1e-3, "batch_sequences": 4, "gradient_accumulation_steps": 1,
                              "eval_steps": 1}},
            "merge": {"kind": "merge", "from": "sft"},
            "dpo": {"kind": "dpo", "from": "merge", "data": [{"path": "builtin:tasks-preference"}], "max_examples": 32,
                    "precompute_reference": True,
                    "train": {**steps, "lr": 1e-4, "batch_pairs": 4, "gradient_accumulation_steps": 1, "eval_steps": 1}},
            "grpo": {"kind": "grpo", "from": "dpo", "data": [{"path": "builtin:tasks-prompts"}], "reward": "exact_match",
                     "group_size": 2, "max_new_tokens": 4, "eval_prompts": 4, "max_prompts": 32,
                     "train": {**steps, "lr": 1e-5, "rollout_prompts": 4, "batch_prompts": 2, "ppo_epochs": 1}},
            "eval": {"kind": "eval", "from": ["merge", "grpo"], "data": [{"path": "builtin:stdlib"}],
                     "batch_sequences": 2, "batches": 2, "max_new_tokens": 4, "seq_len": 32,
                     "tasks": [{"path": "builtin:tasks-prompts", "split": "test"}], "tasks_limit": 4,
                     "preferences": [{"path": "builtin:tasks-preference", "split": "test"}], "preferences_limit": 4,
                     "models": [{"name": "base", "path": str(folder)}]},
            "export": {"kind": "export", "from": "grpo", "format": "hf"},
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("family,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_a_stock_model_goes_through_every_stage_and_keeps_its_family(family, cls, tokenizer_dir, harness, isolated):
    from transformers import AutoModelForCausalLM

    from flows.pipeline import pipeline

    folder = stock_folder(family, tokenizer_dir, isolated)
    spec = spec_for(folder, isolated, f"stock-{family}")
    results = pipeline(spec=str(spec))
    assert all(r["status"] == "finished" for r in results.values())
    adapters = json.loads((Path(results["sft"]["outputs"]["adapters"]) / "adapter_config.json").read_text())
    assert sorted(adapters["target_modules"]) == ["q_proj", "v_proj"]
    assert adapters["trainable_token_indices"]  # the chat special tokens' rows trained
    for stage in ("merge", "dpo", "grpo", "export"):  # every model written is still a plain stock model
        config = json.loads((Path(results[stage]["outputs"]["model"]) / "config.json").read_text())
        assert config["architectures"] == [cls], stage
        assert type(AutoModelForCausalLM.from_pretrained(results[stage]["outputs"]["model"])).__name__ == cls
    report = json.loads(Path(results["eval"]["outputs"]["results"]).read_text())
    assert report["model_order"] == ["merge", "grpo", "base"]  # a folder beside the pipeline's own stages
    for model in report["models"].values():
        assert 0.0 <= model["exact_match"] <= 1.0 and 0.0 <= model["preference_accuracy"] <= 1.0
    exported = Path(results["export"]["outputs"]["model"])
    assert (exported / "tokenizer.json").is_file() and (exported / "chat_template.jinja").is_file()
    chat = subprocess.run([sys.executable, "-m", "llmlab.cli", "chat", str(exported), "--max-new-tokens", "4",
                           "--temperature", "0"], input="1+1=\n", capture_output=True, text=True, timeout=180,
                          cwd=isolated)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "chat" in chat.stdout and "bye" in chat.stdout  # one exchange, then Ctrl+D
