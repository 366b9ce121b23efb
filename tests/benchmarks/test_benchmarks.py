"""lm-evaluation-harness tasks on llmlab's models: llmlab's own tasks are held out and offline, the
adapter gives lm-eval the answers and log-likelihoods llmlab's own eval gets (sample by sample), local
task YAMLs run, every task is resolved before anything runs, and contamination finds training rows."""

import json

import pytest
import yaml

from llmlab.benchmarks.builtin import GEN, PAIRS, STDLIB, builtin_tasks, end_of_turn, task_docs
from llmlab.benchmarks.contamination import NgramIndex, item_text, share_seen, training_texts
from llmlab.benchmarks.run import check_benchmarks, metric_name, run_benchmarks
from llmlab.data.formats import SFT
from llmlab.data.sources import DataSource
from llmlab.spec import Benchmark

LIMIT = 64  # documents per task in these tests


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    """A small llmlab model fine-tuned for a few steps on the built-in tasks (so its answers are digits,
    some right, some wrong), with a tokenizer trained on task-like text and llmlab's ChatML."""
    from llmlab.execute import execute_stage
    from llmlab.model import LlmlabConfig, build_model
    from llmlab.models import load_for_generation
    from llmlab.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bench-model")
    texts = [f"{i}+{i % 9 + 1}={i + i % 9 + 1} sort {i % 1000:03d} Return the value of the object." for i in range(400)]
    tok = train_tokenizer(texts, 400, root / "base")
    cfg = LlmlabConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, vocab_size=len(tok), max_seq_len=128,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    build_model(cfg, seed=3).save_pretrained(root / "base")
    spec = {"name": "bench-model", "workdir": str(root / "runs"), "tokenizer": {"path": str(root / "base")},
            "stages": {"sft": {"kind": "sft", "model": str(root / "base"), "data": [{"path": "builtin:tasks"}],
                               "max_examples": 2000, "val_fraction": 0.0,
                               "train": {"max_steps": 60, "lr": 3e-3, "warmup_steps": 5, "batch_sequences": 32,
                                         "gradient_accumulation_steps": 1, "save_every": 60, "log_every": 20}}}}
    (root / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = execute_stage(str(root / "s.yaml"), "sft", {}, None)
    return load_for_generation(result["outputs"]["model"])


def test_llmlabs_own_tasks_are_held_out_and_written_once():
    from llmlab.data.order import held_out
    from llmlab.data.sources import iter_texts
    from llmlab.data.tasks import prompt_split

    docs = task_docs("<|im_end|>")
    assert len(docs[GEN]) == len(docs[PAIRS]) == 500 and len(docs[STDLIB]) >= 150
    assert all(prompt_split(d["prompt"]) == "test" for d in docs[GEN] + docs[PAIRS])  # never a training prompt
    assert all(d["choices"][d["gold"]].endswith("<|im_end|>") for d in docs[PAIRS])
    # stdlib: every item is cut from a held-out docstring and shares no 13-word run with a training-side one
    training = NgramIndex()
    training.add_texts((t for t in iter_texts("builtin:stdlib") if not held_out(t, 0.01)), set())
    assert training.share([d["context"] + d["choices"][d["gold"]] for d in docs[STDLIB]]) == 0.0
    held = " ".join(t for t in iter_texts("builtin:stdlib") if held_out(t, 0.01))
    assert all(d["context"].split()[0] in held for d in docs[STDLIB])
    assert all(len(set(d["choices"])) == 4 for d in docs[STDLIB])
    folder = builtin_tasks("<|im_end|>")
    assert builtin_tasks("<|im_end|>") == folder and builtin_tasks("<|eot_id|>") != folder  # one folder per end-of-turn
    config = yaml.safe_load((folder / f"{GEN}.yaml").read_text())
    assert config["generation_kwargs"]["until"] == ["<|im_end|>"] and config["dataset_path"] == "json"


def test_the_end_of_turn_is_read_from_the_chat_template(model_and_tokenizer):
    _, tok = model_and_tokenizer
    assert end_of_turn(tok) == "<|im_end|>"


def test_lm_evals_exact_match_is_llmlabs_own_answer_for_answer(model_and_tokenizer, tmp_path):
    """The same prompts, rendered the same way, give the same greedy answers; and the task's filter and
    metric score an answer as llmlab's exact_match does (checked on a copy of the task whose targets
    are, for every other prompt, the model's own answer: a small model gets few of the real ones right)."""
    from llmlab.data.tasks import cut_at_end_of_turn, exact_match
    from llmlab.evaluate import checkable_prompts, task_completions

    model, tok = model_and_tokenizer
    found = run_benchmarks(model, tok, [Benchmark(task=GEN, limit=LIMIT)], seed=1)[GEN]
    tasks = checkable_prompts([DataSource(path="builtin:tasks-prompts", split="test")], LIMIT)
    ours = task_completions(model, tok, [t.prompt for t in tasks], 16)
    assert found.n == LIMIT and [s["prompt"] for s in found.samples] == [
        tok.apply_chat_template([{"role": "user", "content": t.prompt}], tokenize=False, add_generation_prompt=True)
        for t in tasks]
    assert [s["answer"] for s in found.samples] == [cut_at_end_of_turn(c).strip() for c in ours]
    assert len({s["answer"] for s in found.samples}) > 1  # real, differing answers were compared
    assert found.metrics["exact_match"] == sum(exact_match(c, t.answer) for c, t in zip(ours, tasks)) / LIMIT
    # the task's own config over targets half of which are the model's answers (with stray spaces)
    folder = builtin_tasks(end_of_turn(tok))
    config = yaml.safe_load((folder / f"{GEN}.yaml").read_text())
    targets = [(f" {cut_at_end_of_turn(c).strip()} " if i % 2 else t.answer) for i, (c, t) in enumerate(zip(ours, tasks))]
    (tmp_path / "own.jsonl").write_text("".join(json.dumps({"prompt": t.prompt, "answer": a}) + "\n"
                                                for t, a in zip(tasks, targets)))
    config.update(task="own_answers", dataset_kwargs={"data_files": {"test": str(tmp_path / "own.jsonl")}},
                  doc_to_target="{{answer.strip()}}")
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(config))
    own = run_benchmarks(model, tok, [Benchmark(task="own_answers", include=str(tmp_path / "own.yaml"), chat_template=True)],
                         seed=1)["own_answers"]
    expected = sum(exact_match(c, a) for c, a in zip(ours, targets)) / LIMIT
    assert own.metrics["exact_match"] == expected >= 0.5


def test_the_pairs_as_multiple_choice_score_llmlabs_preference_accuracy_pair_for_pair(model_and_tokenizer):
    from llmlab.data.preference import preference_pairs
    from llmlab.evaluate import preference_wins

    model, tok = model_and_tokenizer
    found = run_benchmarks(model, tok, [Benchmark(task=PAIRS, limit=LIMIT)], seed=1)[PAIRS]
    pairs = preference_pairs([DataSource(path="builtin:tasks-preference", split="test")], tok, 10**6, LIMIT)
    wins = preference_wins(model, pairs, tok.pad_token_id)
    assert [s["answer"] == s["target"] for s in found.samples] == wins
    assert 0 < sum(wins) < LIMIT  # both outcomes occur, so the pair-by-pair match means something
    assert found.metrics["acc"] == pytest.approx(sum(wins) / LIMIT) and found.stderr["acc"] > 0


def test_stdlib_continuations_are_scored_as_plain_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    found = run_benchmarks(model, tok, [Benchmark(task=STDLIB, limit=LIMIT)], seed=1)[STDLIB]
    assert found.n == LIMIT and "<|im_start|>" not in found.samples[0]["prompt"]  # no chat template by default
    assert {s["answer"] for s in found.samples} <= {0, 1, 2, 3} and 0 <= found.metrics["acc"] <= 1


def local_task(folder, rows, name="my_task", data="rows.jsonl") -> Benchmark:
    """A generation task YAML over a local JSONL file (prompt -> answer), as a user writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return Benchmark(task=name, include=str(folder))


def test_a_local_task_yaml_over_local_files_runs_offline(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    rows = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(12)]
    found = run_benchmarks(model, tok, [local_task(tmp_path / "tasks", rows)], seed=1)["my_task"]
    assert found.n == 12 and set(found.metrics) == {"exact_match"} and "exact_match" in found.stderr
    assert found.samples[0]["prompt"] == "What is 0 plus one?" and found.samples[0]["target"] == "1"
    assert found.documents[0] == "What is 0 plus one? 1"


def test_every_task_is_resolved_before_anything_runs(tmp_path):
    good = local_task(tmp_path / "good", [{"question": "q", "answer": "a"}])
    missing_data = local_task(tmp_path / "nodata", [{"question": "q", "answer": "a"}], name="nodata", data="gone.jsonl")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    problems = check_benchmarks([
        Benchmark(task=GEN), good, Benchmark(task="llmlab_task_gen"), Benchmark(task="arc_eazy"), Benchmark(task="arc_easy"),
        missing_data, Benchmark(task="broken", include=str(tmp_path / "broken")),
        Benchmark(task="other", include=str(good.include)), Benchmark(task="x", include=str(tmp_path / "nowhere")),
    ], offline=True)
    by = {(i, f): m for i, f, m in problems}
    assert set(by) == {(2, "task"), (3, "task"), (4, "task"), (5, "include"), (6, "include"), (7, "task"), (8, "include")}
    assert "did you mean llmlab_tasks_gen" in by[2, "task"] and "arc_easy" in by[3, "task"]
    assert "allenai/ai2_arc" in by[4, "task"] and "not in the local cache" in by[4, "task"] and "include" in by[4, "task"]
    assert "gone.jsonl" in by[5, "include"] and "dataset_kwargs.data_files" in by[5, "include"]
    assert "broken.yaml" in by[6, "include"] and "does not parse" in by[6, "include"]
    assert f"unknown task 'other' in {good.include}" in by[7, "task"]
    assert "nowhere does not exist" in by[8, "include"]


def test_metric_names_drop_the_default_filter_and_keep_others():
    assert metric_name("acc,none") == "acc" and metric_name("exact_match,strict-match") == "exact_match_strict-match"
    assert metric_name("word_perplexity,none") == "word_perplexity"


def test_contamination_finds_training_rows_and_nothing_held_out(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{i}+7="}, {"role": "assistant", "content": str(i + 7)}]}
            for i in range(300)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [DataSource(path=str(tmp_path / "train.jsonl"))]
    index = NgramIndex(13)
    seen_rows = [f"{i}+7= {i + 7}" for i in range(300)]
    unseen = [f"{i}+7= {i + 7}" for i in range(300, 400)]
    index.add_texts(training_texts(sources, SFT, seed=1, val_fraction=0.0), index.sizes_for(seen_rows + unseen))
    assert index.share(seen_rows) == 1.0 and index.share(unseen) == 0.0
    assert not index.seen("7 307")  # a short document counts only as the start of a training example
    held = NgramIndex(13)  # a held-out share was never trained on
    held.add_texts(training_texts(sources, SFT, seed=1, val_fraction=0.5), held.sizes_for(seen_rows))
    assert 0.3 < held.share(seen_rows) < 0.7
    long = " ".join(f"word{i}" for i in range(30))
    index.add_texts([long], set())
    assert index.seen("prefix " + " ".join(long.split()[5:18]) + " suffix") and not index.seen(" ".join(long.split()[5:17]))
    assert item_text(({"role": "user", "content": "a"}, "b", ["c"])) == "a b c"


def test_a_model_trained_by_several_stages_is_checked_against_each_stages_text_as_one():
    documents = [f"{i}+7= {i + 7}" for i in range(40)] + [" ".join(f"w{i}x{j}" for j in range(20)) for i in range(10)]
    first, second = documents[:25], documents[25:45]  # two stages' training text; the last five never trained on
    whole, a, b = NgramIndex(13), NgramIndex(13), NgramIndex(13)
    sizes = whole.sizes_for(documents)
    whole.add_texts(first + second, sizes)
    a.add_texts(first, sizes)
    b.add_texts(second, sizes)
    assert share_seen([a, b], documents) == whole.share(documents) == 45 / 50
    assert share_seen([a], documents) == a.share(documents) == 25 / 50 and share_seen([a, b], []) == 0.0



def test_validate_names_an_unknown_task_with_the_nearest_ones_and_runs_nothing(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    raw = yaml.safe_load((ROOT / "pipelines" / "tiny.yaml").read_text())
    raw["workdir"] = str(tmp_path / "runs")
    raw["stages"]["eval"]["benchmarks"] = [{"task": "llmlab_stdlib"}, {"task": "llmlab_tasks_gen"}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "validate", str(tmp_path / "s.yaml")], capture_output=True,
                         text=True, cwd=tmp_path, env={**os.environ, "LLMLAB_STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "stage 'eval': benchmarks[0].task: unknown task 'llmlab_stdlib': did you mean llmlab_stdlib_mc" in out.stderr
    assert "benchmarks[1]" not in out.stderr and not (tmp_path / "runs").exists()
