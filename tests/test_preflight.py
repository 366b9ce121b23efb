"""Checks before anything runs: `llmlab validate` (and `llmlab run`) open every local data file,
model folder and tokenizer a spec names, report every problem at once with the stage, the file and
the fix, exit 2, and run nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmlab.preflight import preflight
from llmlab.spec import parse_spec

TEXT_SOURCE = [{"path": "builtin:stdlib"}]


def spec(tmp_path, stages: dict, tokenizer=None) -> Path:
    raw = {"name": "pre", "workdir": str(tmp_path / "runs"),
           "tokenizer": tokenizer or {"train": {"vocab_size": 300, "data": TEXT_SOURCE}},
           "stages": {"pretrain": {"kind": "pretrain", "data": TEXT_SOURCE}, **stages}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def problems_of(path: Path) -> list[str]:
    found, _ = preflight(parse_spec(path.read_text(), str(path)))
    return [p.render() for p in found]


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_data_problem_is_named_with_its_stage_file_and_fix(tmp_path):
    wrong_columns = jsonl(tmp_path / "chats.jsonl", [{"foo": 1, "bar": 2}] * 5)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    bad_rows = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "same", "rejected": " "}] * 5
                     + [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 5)
    path = spec(tmp_path, {
        "sft": {"kind": "sft", "from": "pretrain", "data": [{"path": wrong_columns}, {"path": str(empty)}]},
        "dpo": {"kind": "dpo", "from": "pretrain", "data": [{"path": str(latin)}, {"path": bad_rows}]},
        "grpo": {"kind": "grpo", "from": "pretrain", "reward": "exact_match", "data": [{"path": wrong_columns, "format": "prompt"}]},
    })
    found = problems_of(path)
    assert len(found) == 5, found
    assert any("stage 'sft'" in p and "chats.jsonl" in p and "bar, foo" in p and "question_answer (question, answer)" in p
               and "format:" in p for p in found)
    assert any("stage 'sft'" in p and "empty.jsonl" in p and "has no rows" in p for p in found)
    assert any("stage 'dpo'" in p and "latin.jsonl is not UTF-8" in p for p in found)
    assert any("stage 'dpo'" in p and "5 of its first 10 rows are malformed" in p and "rejected response is empty" in p
               for p in found)
    assert any("stage 'grpo'" in p and "named format 'prompt', which needs the column(s) prompt" in p for p in found)


def test_good_local_data_and_builtin_sources_pass(tmp_path):
    chats = jsonl(tmp_path / "qa.jsonl", [{"question": f"{i}?", "answer": str(i)} for i in range(10)])
    path = spec(tmp_path, {"sft": {"kind": "sft", "from": "pretrain", "data": [{"path": chats}, {"path": "builtin:tasks"}]}})
    assert problems_of(path) == []


def test_a_workdir_that_cannot_be_written_is_named_before_anything_runs(tmp_path, monkeypatch):
    import llmlab.preflight as pre

    (tmp_path / "blocker").write_text("a file where the workdir's parent should be")
    raw = yaml.safe_load(spec(tmp_path, {}).read_text())
    raw["workdir"] = str(tmp_path / "blocker" / "runs")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    (found,) = problems_of(tmp_path / "s.yaml")
    assert found.startswith(f"workdir {tmp_path / 'blocker' / 'runs'}: ") and "is a file, not a folder" in found
    # a folder this user cannot write (tests run as root, which may write anywhere: ask os.access to say no)
    raw["workdir"] = str(tmp_path / "readonly" / "runs")
    (tmp_path / "readonly").mkdir()
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(pre.os, "access", lambda path, mode: Path(path) != tmp_path / "readonly")
    (found,) = problems_of(tmp_path / "s.yaml")
    assert f"{tmp_path / 'readonly'} is not writable" in found and "point `workdir`" in found


def model_folder(path: Path, architectures: list[str], vocab_size: int = 300, weights: bool = True) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": architectures, "model_type": "llama",
                                                  "vocab_size": vocab_size}))
    if weights:
        (path / "model.safetensors").write_bytes(b"{}")
    return str(path)


def test_a_model_that_cannot_serve_its_stage_fails_validation_naming_model_and_stage(tmp_path):
    from llmlab.tokenizer import train_tokenizer

    classifier = model_folder(tmp_path / "rm", ["LlamaForSequenceClassification"])
    causal = model_folder(tmp_path / "lm", ["LlamaForCausalLM"])
    no_weights = model_folder(tmp_path / "empty", ["LlamaForCausalLM"], weights=False)
    small = model_folder(tmp_path / "small", ["LlamaForCausalLM"], vocab_size=260)
    tokens = len(train_tokenizer([f"word {i} and more words" for i in range(300)], 300, tmp_path / "small"))
    assert tokens > 260
    path = spec(tmp_path, {
        "sft": {"kind": "sft", "model": classifier, "data": [{"path": "builtin:tasks"}]},
        "dpo": {"kind": "dpo", "model": no_weights, "data": [{"path": "builtin:tasks-preference"}]},
        "grpo": {"kind": "grpo", "model": causal, "reward": causal, "data": [{"path": "builtin:tasks-prompts"}]},
        "more": {"kind": "sft", "model": small, "data": [{"path": "builtin:tasks"}]},
        "eval": {"kind": "eval", "data": TEXT_SOURCE, "models": [{"name": "rm", "path": classifier}]},
    })
    found = problems_of(path)
    assert len(found) == 5, found
    assert any("stage 'sft'" in p and "LlamaForSequenceClassification, which has no causal-LM head" in p for p in found)
    assert any("stage 'dpo'" in p and "config.json but no weights" in p for p in found)
    assert any("stage 'grpo'" in p and "not a sequence-classification model" in p and "reward model" in p for p in found)
    assert any("stage 'more'" in p and f"the tokenizer has {tokens} tokens but the model" in p and "260 embedding rows" in p
               for p in found)
    assert any("stage 'eval'" in p and "evaluated model 'rm'" in p for p in found)


def test_hub_names_are_skipped_offline_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = spec(tmp_path, {"sft": {"kind": "sft", "model": "Qwen/Qwen2.5-0.5B-Instruct",
                                   "data": [{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}]}})
    found, notes = preflight(parse_spec(path.read_text(), str(path)))
    assert found == []
    assert any("Qwen/Qwen2.5-0.5B-Instruct not checked (offline)" in n for n in notes)
    assert any("ultrachat_200k not checked (offline)" in n for n in notes)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_the_cli_reports_every_problem_without_a_traceback_and_runs_nothing(tmp_path, command):
    wrong = jsonl(tmp_path / "chats.jsonl", [{"foo": 1}] * 3)
    path = spec(tmp_path, {"sft": {"kind": "sft", "from": "pretrain", "data": [{"path": wrong}]}})
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", command, str(path)], capture_output=True, text=True,
                         cwd=tmp_path, env={**__import__("os").environ, "LLMLAB_STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "stage 'sft'" in out.stderr and "chats.jsonl" in out.stderr and "could not detect the SFT format" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "runs").exists()  # no stage ran


def test_a_problem_every_branch_of_a_sweep_shares_is_reported_once_for_the_stage(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = spec(tmp_path, {"sft": {"kind": "sft", "from": "pretrain", "data": [{"path": str(empty)}],
                                   "sweep": {"train.lr": [1e-4, 3e-4, 1e-3]}}})
    found = [p for p in problems_of(path) if "empty.jsonl" in p]
    assert found == [f"stage 'sft': {empty}: it has no rows: add rows, or remove it from the stage's data "
                     f"(all 3 of its branches or rounds)"]


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_down(tmp_path, monkeypatch):
    """Online, with a hub that does not answer (HF_ENDPOINT on a closed port) and an empty cache of our own."""
    import llmlab.preflight as pre

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(pre, "_hub_answers", {})
    return tmp_path / "hub"


def cache_model(hub: Path, name: str) -> None:
    """A hub model as huggingface_hub's cache keeps it: a snapshot its `main` ref points at."""
    repo = hub / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                      "vocab_size": 300}))


def test_a_hub_that_does_not_answer_stops_the_run_before_any_stage_for_what_is_not_cached(tmp_path, hub_down):
    import os

    path = spec(tmp_path, {"sft": {"kind": "sft", "model": "acme/tiny-llama", "data": [{"path": "acme/chats"}]}})
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(path)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "LLMLAB_STATE_DIR": str(tmp_path / "state")}, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout, out.stderr
    endpoint = os.environ["HF_ENDPOINT"]
    assert f"stage 'sft': acme/tiny-llama: the Hugging Face hub at {endpoint} does not answer and this model is not in " \
           f"the local cache ({hub_down})" in out.stderr
    assert f"stage 'sft': acme/chats: the Hugging Face hub at {endpoint} does not answer" in out.stderr
    assert "HF_DATASETS_OFFLINE=1" in out.stderr and not (tmp_path / "runs").exists()


def test_a_hub_that_does_not_answer_costs_one_note_when_its_models_are_cached(tmp_path, hub_down, monkeypatch):
    import os

    cache_model(hub_down, "acme/tiny-llama")
    path = spec(tmp_path, {"sft": {"kind": "sft", "model": "acme/tiny-llama", "data": TEXT_SOURCE}})
    found, notes = preflight(parse_spec(path.read_text(), str(path)))
    assert found == [], found
    assert notes[0] == (f"the Hugging Face hub at {os.environ['HF_ENDPOINT']} does not answer: hub models are read from "
                        f"the local cache ({hub_down}) for this run")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the stages go straight to the cache


def test_a_spec_that_requires_tracking_refuses_to_start_while_mlflow_does_not_answer(tmp_path):
    import os

    path = spec(tmp_path, {})
    raw = yaml.safe_load(path.read_text())
    raw["tracking"] = {"uri": f"http://127.0.0.1:{closed_port()}", "required": True}
    path.write_text(yaml.safe_dump(raw))
    assert problems_of(path) == [f"tracking.required: MLflow at {raw['tracking']['uri']} does not answer (asked for 2 s): "
                                 f"start the server, point tracking.uri at one that runs, or set `required: false` to "
                                 f"run now and send the records when it answers"]
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(path)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "LLMLAB_STATE_DIR": str(tmp_path / "state")}, timeout=120)
    assert out.returncode == 2 and "tracking.required: MLflow at" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
    raw["tracking"]["required"] = False
    path.write_text(yaml.safe_dump(raw))
    assert problems_of(path) == []


def test_malformed_rows_past_the_sample_are_a_warning_with_their_count_and_first_line(tmp_path):
    from helpers import half_broken_text

    rows = [json.dumps({"text": f"line {i} of a corpus"}) for i in range(120)]
    rows[90] = "{not json"
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(rows) + "\n")
    spec = parse_spec(yaml.safe_dump({"name": "w", "tokenizer": {"name": "gpt2"}, "workdir": str(tmp_path / "runs"),
                                      "stages": {"pretrain": {"kind": "pretrain", "data": [{"path": str(data)}]}}}))
    problems, notes = preflight(spec, tmp_path / "w.yaml")
    (warning,) = [n for n in notes if n.startswith("warning:")]
    assert not problems and "1 of its 120 rows are malformed and will be skipped" in warning and "line 91" in warning
    half_broken_text(data, 60, 200)  # most rows broken past the sample: the stage would stop there
    problems, notes = preflight(spec, tmp_path / "w.yaml")
    (warning,) = [n for n in notes if n.startswith("warning:")]
    assert "200 of its 260 rows" in warning and "the stage will stop when it reads them" in warning
