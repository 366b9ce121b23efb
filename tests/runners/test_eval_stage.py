"""The eval stage with lm-evaluation-harness tasks: LoRA adapters scored without a merge stage beside a
model folder, only benchmarks (no text data), results in results.json, the report and MLflow, the
scored documents kept, contamination against the upstream stages' training data, and a gate on a score."""

import json

import pytest
import torch
import yaml

from llmlab.execute import execute_stage
from llmlab.tokenizer import train_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"what follows {i}"}, {"role": "assistant", "content": f"{i + 1}"}]}
        for i in range(120)]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A stock Llama folder, conversations to fine-tune it on, and a local task YAML over those very rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    base = tmp_path / "llama"
    tok = train_tokenizer([f"what follows {i} {i + 1}" for i in range(300)], 320, base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                 num_hidden_layers=2, vocab_size=len(tok) + 2, max_position_embeddings=128)).save_pretrained(base)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    seen = tmp_path / "seen"  # a benchmark built from the training rows themselves
    seen.mkdir()
    (seen / "rows.jsonl").write_text("".join(json.dumps({"q": r["messages"][0]["content"], "a": r["messages"][1]["content"]})
                                             + "\n" for r in ROWS))
    (seen / "seen.yaml").write_text(yaml.safe_dump({
        "task": "seen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(seen / "rows.jsonl")}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return tmp_path


def spec(project, gates=()):
    return {"name": "bench-eval", "workdir": str(project / "runs"), "tokenizer": {"path": str(project / "llama")},
            "stages": {
                "sft": {"kind": "sft", "model": str(project / "llama"), "data": [{"path": str(project / "train.jsonl")}],
                        "val_fraction": 0.0, "lora": {"preset": "minimal", "r": 4},
                        "train": {"max_steps": 4, "warmup_steps": 1, "batch_sequences": 8, "gradient_accumulation_steps": 1,
                                  "save_every": 4, "log_every": 2}},
                "eval": {"kind": "eval", "from": "sft", "models": [{"name": "base", "path": str(project / "llama")}],
                         "gates": list(gates),
                         "benchmarks": [{"task": "seen", "include": str(project / "seen"), "limit": 40},
                                        {"task": "llmlab_tasks_mc", "limit": 40}]}}}


def test_benchmarks_score_adapters_and_folders_and_find_their_own_training_rows(project):
    from mlflow.tracking import MlflowClient

    (project / "s.yaml").write_text(yaml.safe_dump(spec(project), sort_keys=False))
    sft = execute_stage(str(project / "s.yaml"), "sft", {}, None)
    assert "model" not in sft["outputs"]  # LoRA: adapters only, and no merge stage follows
    result = execute_stage(str(project / "s.yaml"), "eval", {"sft": sft}, None)
    metrics = result["metrics"]
    for model in ("sft", "base"):
        for key in ("bench/seen/exact_match", "bench/seen/exact_match_stderr", "bench/llmlab_tasks_mc/acc",
                    "bench/llmlab_tasks_mc/acc_stderr"):
            assert f"{model}/{key}" in metrics, (model, key)
        assert 0.0 <= metrics[f"{model}/bench/llmlab_tasks_mc/acc"] <= 1.0
    assert "sft/eval/loss" not in metrics  # no text data given: only the benchmarks ran
    # the local task is the sft stage's own training rows; the built-in task's pairs are held out
    assert metrics["sft/bench/seen/contamination"] == pytest.approx(1.0)
    assert metrics["sft/bench/llmlab_tasks_mc/contamination"] == 0.0
    assert "base/bench/seen/contamination" not in metrics  # a model folder's training data is unknown here
    results = json.loads((project / "runs" / "eval" / "results.json").read_text())
    assert results["models"]["sft"]["bench/seen/exact_match"] == metrics["sft/bench/seen/exact_match"]
    report = (project / "runs" / "eval" / "report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in report and "seen/exact_match" in report and "100.0%" in report
    samples = [json.loads(line) for line in (project / "runs" / "eval" / "benchmarks" / "sft" / "seen.jsonl").read_text().splitlines()]
    assert len(samples) == 40 and samples[0]["prompt"] == "what follows 0" and samples[0]["target"] == "1"
    assert {"answer", "exact_match"} <= set(samples[0])
    client = MlflowClient(f"sqlite:///{project / 'state' / 'mlflow.db'}")
    assert client.get_metric_history(result["mlflow_run_id"], "sft/bench/seen/exact_match")
    logged = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "benchmarks/sft")}
    assert "benchmarks/sft/seen.jsonl" in logged and "benchmarks/sft/llmlab_tasks_mc.jsonl" in logged


def test_a_gate_on_a_benchmark_score_stops_the_pipeline(project):
    from llmlab.gates import GateFailed

    (project / "s.yaml").write_text(yaml.safe_dump(spec(project, gates=["sft/bench/llmlab_tasks_mc/acc > 1.5"]),
                                                   sort_keys=False))
    sft = execute_stage(str(project / "s.yaml"), "sft", {}, None)
    with pytest.raises(GateFailed, match=r"gate 'sft/bench/llmlab_tasks_mc/acc > 1.5' failed"):
        execute_stage(str(project / "s.yaml"), "eval", {"sft": sft}, None)
