"""The sft stage on a model llmlab did not build: "have a base model? start with SFT"."""

import json

import torch
import yaml

from llmlab.execute import execute_stage
from llmlab.tokenizer import train_tokenizer


def llmlab_base(tmp_path, monkeypatch):
    """A tiny llmlab model and its tokenizer in tmp_path/base; the test runs from tmp_path with its own state."""
    from llmlab.model import LlmlabConfig, build_model

    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    base = tmp_path / "base"
    tok = train_tokenizer([f"{i}+1={i + 1} rev a b c sort 321" for i in range(300)], 320, base)
    build_model(LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok), max_seq_len=64,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), seed=0).save_pretrained(base)
    return base, tok


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


def test_with_val_fraction_0_a_stage_logs_no_eval_numbers_and_keeps_its_last_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    base, tok = llmlab_base(tmp_path, monkeypatch)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Line {i}: {i}+1={i + 1} rev a b c sort 321" for i in range(300)))
    train = {"max_steps": 4, "warmup_steps": 1, "batch_sequences": 4, "eval_every": 2, "eval_steps": 2, "save_every": 2,
             "log_every": 1, "save_best_only": True}
    spec = {"name": "noval", "workdir": str(tmp_path / "runs"), "tokenizer": {"path": str(base)},
            "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_seq_len": 32},
            "stages": {"sft": {"kind": "sft", "model": str(base), "data": [{"path": "builtin:tasks"}], "max_examples": 64,
                               "val_fraction": 0.0, "lora": {"preset": "all", "r": 4}, "train": train},
                       "cpt": {"kind": "pretrain", "data": [{"path": str(corpus)}], "val_fraction": 0.0,
                               "train": train}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    for name in ("sft", "cpt"):
        result = execute_stage(str(tmp_path / "s.yaml"), name, {}, None)
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert not [k for r in rows for k in r if k.startswith("eval/")], name  # no invented eval loss / perplexity
        assert not [k for k in result["metrics"] if k.startswith("eval/")] and "best_step" not in result["metrics"]
        assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    sft_rows = [json.loads(line) for line in (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft_rows[0]["data/val_examples"] == 0.0  # not even the built-in source's own validation split
    # with save_best_only and nothing to pick the best by, the output is the last model
    adapters = tmp_path / "runs" / "sft" / "adapters"
    final = load_file(adapters / "final" / "adapter_model.safetensors")
    kept = load_file(adapters / "best" / "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    last = torch.load(sorted((tmp_path / "runs" / "cpt" / "checkpoints").glob("step-*"))[-1] / "state.pt",
                      weights_only=False)["model"]
    exported = load_file(tmp_path / "runs" / "cpt" / "model" / "model.safetensors")
    assert exported.keys() <= last.keys() and all(torch.equal(exported[k], last[k].to(exported[k].dtype)) for k in exported)


def test_lora_with_train_embeddings_learns_every_token_row_and_merge_folds_them_in(tmp_path, monkeypatch):
    """`train_embeddings`: the embedding rows of ordinary tokens train beside the adapters (not only the
    special tokens' rows), and the merged model carries them."""
    from safetensors.torch import load_file

    base, tok = llmlab_base(tmp_path, monkeypatch)
    train = {"max_steps": 3, "warmup_steps": 1, "batch_sequences": 8, "eval_every": 3, "eval_steps": 1, "save_every": 3,
             "log_every": 1, "lr": 1e-2}
    lora = {"preset": "all", "r": 4, "dropout": 0.0, "train_embeddings": True}
    spec = {"name": "emb", "workdir": str(tmp_path / "runs"), "tokenizer": {"path": str(base)},
            "stages": {"sft": {"kind": "sft", "model": str(base), "data": [{"path": "builtin:tasks"}], "max_examples": 64,
                               "lora": lora, "train": train},
                       "merge": {"kind": "merge", "from": "sft"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sft = execute_stage(str(tmp_path / "s.yaml"), "sft", {}, None)
    saved = load_file(tmp_path / "runs" / "sft" / "adapters" / "best" / "adapter_model.safetensors")
    (rows,) = [v for k, v in saved.items() if "trainable_tokens" in k]
    assert rows.shape == (len(tok), 32)
    merge = execute_stage(str(tmp_path / "s.yaml"), "merge", {"sft": sft}, None)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    after = AutoModelForCausalLM.from_pretrained(merge["outputs"]["model"]).get_input_embeddings().weight
    changed = set(torch.nonzero((after - before).abs().sum(-1) > 0).flatten().tolist())
    digits = set(tok("0123456789+=", add_special_tokens=False)["input_ids"])
    assert digits <= changed and len(changed - set(tok.all_special_ids)) > 10
