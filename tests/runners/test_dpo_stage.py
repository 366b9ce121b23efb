"""The dpo stage end to end on a tiny model: every reference mode runs, and the precomputed
reference trains exactly like the live frozen copy."""

import json

import pytest
import torch
import yaml

from llmlab.model import LlmlabConfig, build_model
from llmlab.models import load_causal_lm as load_model
from llmlab.execute import execute_stage
from llmlab.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-base")
    texts = [f"{i}+1={i + 1} rev a b c sort 321 max 3729" for i in range(300)]
    tok = train_tokenizer(texts, 330, root)
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok), max_seq_len=64,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    build_model(cfg, seed=0).save_pretrained(root)
    return root


def run_dpo(tmp_path, base, monkeypatch, **changes):
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    stage = {"kind": "dpo", "model": str(base), "data": [{"path": "builtin:tasks-preference"}], "max_examples": 32,
             "beta": 0.2, "train": {"max_steps": 4, "lr": 1e-3, "batch_pairs": 4, "gradient_accumulation_steps": 2, "eval_every": 2,
                                    "eval_steps": 2, "save_every": 2, "log_every": 1}}
    stage.update(changes)
    spec = {"name": "dpo-test", "workdir": str(tmp_path / "runs"), "tokenizer": {"path": str(base)}, "stages": {"dpo": stage}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    result = execute_stage(str(tmp_path / "s.yaml"), "dpo", {}, None)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def test_precomputed_reference_trains_like_the_live_frozen_copy(tmp_path, base, monkeypatch):
    live, live_rows = run_dpo(tmp_path / "live", base, monkeypatch)
    pre, pre_rows = run_dpo(tmp_path / "pre", base, monkeypatch, precompute_reference=True)
    live_losses = [r["train/loss"] for r in live_rows if "train/loss" in r]
    pre_losses = [r["train/loss"] for r in pre_rows if "train/loss" in r]
    assert len(live_losses) == 4 and live_losses == pytest.approx(pre_losses, abs=1e-5)
    # step 1 starts at the reference: every implicit reward is 0, so the loss is log 2
    assert live_losses[0] == pytest.approx(0.6931, abs=1e-3)
    for key in ("dpo/accuracy", "dpo/margin", "rewards/chosen", "rewards/rejected"):
        assert all(key in r for r in live_rows if "train/loss" in r)
    assert {"eval/loss", "eval/accuracy", "eval/margin"} <= set(live["metrics"])
    assert (tmp_path / "live" / "runs" / "dpo" / "model" / "model.safetensors").is_file()


def test_lora_dpo_uses_the_adapter_free_model_as_reference(tmp_path, base, monkeypatch):
    result, rows = run_dpo(tmp_path, base, monkeypatch, lora={"preset": "minimal", "r": 4})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["llmlab.reference"] == "the same model with adapters disabled"
    assert (tmp_path / "runs" / "dpo" / "adapters" / "best" / "adapter_config.json").is_file()
    first = next(r for r in rows if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(0.6931, abs=1e-3)  # adapters start at zero: policy == reference


def test_a_named_reference_model_is_used_instead_of_the_start_model(tmp_path, base, monkeypatch):
    other = tmp_path / "other"
    from transformers import AutoModelForCausalLM

    import llmlab.model  # noqa: F401

    ref = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(other)
    result, rows = run_dpo(tmp_path / "run", base, monkeypatch, reference_model=str(other))
    first = next(r for r in rows if "train/loss" in r)
    assert first["train/loss"] != pytest.approx(0.6931, abs=1e-3)  # policy != reference from step 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'state' / 'mlflow.db'}")
    assert client.get_run(result["mlflow_run_id"]).data.tags["llmlab.reference"] == f"model {other}"


def test_export_stage_writes_a_stock_llama_from_an_upstream_stage(tmp_path, base, monkeypatch):
    """kind: export after a stage: a plain Llama checkpoint that stock transformers loads."""
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    spec = {"name": "export-test", "workdir": str(tmp_path / "runs"), "tokenizer": {"path": str(base)},
            "stages": {"sft": {"kind": "sft", "model": str(base), "data": [{"path": "builtin:tasks"}], "max_examples": 16,
                               "train": {"max_steps": 1, "warmup_steps": 0, "batch_sequences": 4, "gradient_accumulation_steps": 1,
                                         "eval_every": 1, "eval_steps": 1, "save_every": 1, "log_every": 1}},
                       "export": {"kind": "export", "from": "sft", "format": "llama"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sft = execute_stage(str(tmp_path / "s.yaml"), "sft", {}, None)
    out = execute_stage(str(tmp_path / "s.yaml"), "export", {"sft": sft}, None)
    llama = LlamaForCausalLM.from_pretrained(out["outputs"]["model"])
    ours = load_model(sft["outputs"]["model"])
    x = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        assert (llama(input_ids=x).logits - ours(input_ids=x).logits).abs().max() < 1e-4
