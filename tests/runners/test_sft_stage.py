"""The sft stage on a model llmlab did not build: "have a base model? start with SFT"."""

import json

import torch
import yaml

from llmlab.stages import execute_stage
from llmlab.tokenizer import train_tokenizer


def test_sft_stage_starts_from_a_plain_transformers_llama_dir(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    base = tmp_path / "llama"
    texts = [f"{i}+1={i + 1} rev a b c sort 321 {w}" for i, w in enumerate(["alpha", "beta", "gamma"] * 50)]
    tok = train_tokenizer(texts, 320, base)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                         num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=64))
    llama.save_pretrained(base)
    spec = {
        "name": "sft-hf", "workdir": str(tmp_path / "runs"), "tokenizer": {"path": str(base)},
        "stages": {"sft": {"kind": "sft", "model": str(base), "data": [{"path": "builtin:tasks"}], "max_examples": 64,
                           "lora": {"preset": "minimal", "r": 4},
                           "train": {"max_steps": 3, "warmup_steps": 1, "batch_sequences": 4, "gradient_accumulation_steps": 1,
                                     "eval_every": 3, "eval_steps": 2, "save_every": 3, "log_every": 1}}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    result = execute_stage(str(tmp_path / "s.yaml"), "sft", {}, None)
    adapters = tmp_path / "runs" / "sft" / "adapters"
    config = json.loads((adapters / "best" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert result["status"] == "finished" and result["metrics"]["train/steps"] == 3.0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
