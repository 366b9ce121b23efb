"""Reusing finished stages, unit by unit: the cache key, the integrity check and the stage lock."""

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import llmlab.code
from llmlab import reuse
from llmlab.checkpoint import atomic_write_json, fingerprint
from llmlab.code import code_version
from llmlab.reuse import cache_key, finished_result, stage_lock
from llmlab.runners.registry import KINDS
from llmlab.spec import parse_spec

SPEC = {
    "name": "keys", "seed": 1, "workdir": "runs/keys",
    "tokenizer": {"path": "./tok"},
    "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_seq_len": 32},
    "stages": {
        "pretrain": {"kind": "pretrain", "data": [{"path": "builtin:stdlib"}],
                     "train": {"max_steps": 10, "lr": 1e-3, "warmup_steps": 2, "batch_sequences": 4}},
        "sft": {"kind": "sft", "from": "pretrain", "data": [{"path": "builtin:tasks"}], "lora": {"r": 4},
                "train": {"max_steps": 10, "lr": 1e-3, "warmup_steps": 2, "batch_sequences": 4}},
    },
}
INPUTS = {"pretrain": {"fingerprint": "aaaa"}}


def spec_with(path: str, value):
    raw = json.loads(json.dumps(SPEC))
    node = raw
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return parse_spec(yaml.safe_dump(raw))


@pytest.mark.parametrize("path,value", [
    ("seed", 2),
    ("stages.sft.train.lr", 2e-3),
    ("stages.sft.train.max_steps", 11),
    ("stages.sft.train.batch_sequences", 8),
    ("stages.sft.train.warmup_steps", 3),
    ("stages.sft.train.optimizer", {"name": "lion"}),
    ("stages.sft.lora", {"r": 8}),
    ("stages.sft.data", [{"path": "builtin:tasks-add"}]),
    ("stages.sft.data", [{"path": "builtin:tasks", "weight": 2.0}]),
    ("stages.sft.max_examples", 100),
    ("stages.sft.packing", True),
])
def test_the_cache_key_changes_with_each_config_field(path, value):
    base = cache_key(parse_spec(yaml.safe_dump(SPEC)), "sft", INPUTS)
    assert cache_key(spec_with(path, value), "sft", INPUTS) != base


def test_the_cache_key_of_a_stage_built_from_scratch_follows_the_model_it_builds():
    base = cache_key(parse_spec(yaml.safe_dump(SPEC)), "pretrain", {})
    assert cache_key(spec_with("model.d_model", 64), "pretrain", {}) != base
    # a stage that starts from another's output does not read `model:`; its key does not move
    assert cache_key(spec_with("model.d_model", 64), "sft", INPUTS) == cache_key(parse_spec(yaml.safe_dump(SPEC)), "sft", INPUTS)


def test_the_cache_key_changes_with_an_input_fingerprint_and_with_the_code(monkeypatch):
    spec = parse_spec(yaml.safe_dump(SPEC))
    base = cache_key(spec, "sft", INPUTS)
    assert cache_key(spec, "sft", {"pretrain": {"fingerprint": "bbbb"}}) != base
    assert cache_key(spec, "sft", INPUTS) == base  # and nothing else: it is a pure function
    monkeypatch.setattr(reuse, "code_version", lambda kind: "another")
    assert cache_key(spec, "sft", INPUTS) != base


@pytest.fixture
def source_copy(tmp_path):
    """A copy of the llmlab, flows and tasks packages whose files a test may edit."""
    root = tmp_path / "src"
    for package in llmlab.code.PACKAGES:
        shutil.copytree(llmlab.code.PROJECT_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    yield root
    llmlab.code.clear()


def versions(root) -> dict[str, str]:
    llmlab.code.clear()
    return {kind: code_version(kind, root) for kind in KINDS}


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_comments_and_docstrings_anywhere_keep_every_code_version(source_copy):
    before = versions(source_copy)
    assert before == {kind: code_version(kind) for kind in KINDS}  # the same files give the same versions
    edit(source_copy / "llmlab" / "train" / "loop.py", '"""The one training loop.', '"""The one and only training loop.')
    edit(source_copy / "flows" / "pipeline.py", "\nfrom prefect import flow", "\n# a comment\nfrom prefect import flow")
    edit(source_copy / "llmlab" / "runners" / "dpo.py", "    stage, spec = ctx.config, ctx.spec\n",
         "    stage, spec = ctx.config, ctx.spec  # the block and the pipeline\n")
    assert versions(source_copy) == before


def test_code_a_stage_runs_changes_its_version_and_only_its_own(source_copy):
    before = versions(source_copy)
    edit(source_copy / "llmlab" / "runners" / "dpo.py", "    mini = stage.train.batch_pairs\n",
         "    mini = stage.train.batch_pairs + 0\n")
    after = versions(source_copy)
    assert after["dpo"] != before["dpo"]
    assert {k: v for k, v in after.items() if k != "dpo"} == {k: v for k, v in before.items() if k != "dpo"}
    edit(source_copy / "llmlab" / "train" / "loop.py", "        self.progress.step += 1\n",
         "        self.progress.step += 1\n        self.progress.step += 0\n")
    loop = versions(source_copy)
    assert all(loop[k] != after[k] for k in ("pretrain", "sft", "dpo", "grpo")) and loop["tokenizer"] == after["tokenizer"]


@pytest.mark.parametrize("path", ["flows/pipeline.py", "tasks/stage_tasks.py"])
def test_the_orchestration_is_code_every_stage_runs(source_copy, path):
    before = versions(source_copy)
    target = source_copy / path
    target.write_text(target.read_text() + "\n_ORCHESTRATION_CHANGED = True\n")
    after = versions(source_copy)
    assert all(after[k] != before[k] for k in KINDS)


def test_code_no_stage_runs_keeps_every_version(source_copy):
    before = versions(source_copy)
    for path in ("llmlab/wizard.py", "llmlab/cli.py"):
        target = source_copy / path
        target.write_text(target.read_text() + "\n_NOT_RUN_BY_A_STAGE = True\n")
    assert versions(source_copy) == before


def finish(tmp_path, spec, stage="pretrain", key=None):
    out = Path(spec.output_root) / stage
    model = out / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / "config.json").write_text("{}")
    result = {"stage": stage, "fingerprint": fingerprint(model), "outputs": {"model": str(model)}}
    atomic_write_json(out / "stage.json", {"status": "finished", "cache_key": key or cache_key(spec, stage, {}),
                                           "outputs": {"model": str(model)}, "fingerprint": result["fingerprint"],
                                           "result": result})
    return model, result


def test_a_finished_intact_output_is_reused_and_an_altered_one_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(yaml.safe_dump(SPEC))
    model, result = finish(tmp_path, spec)
    assert finished_result(spec, "pretrain", {}) == result
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 1  # one flipped bit
    weights.write_bytes(bytes(data))
    assert finished_result(spec, "pretrain", {}) is None
    weights.unlink()
    assert finished_result(spec, "pretrain", {}) is None


def test_a_finished_output_with_another_key_is_reused_only_when_not_strict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(yaml.safe_dump(SPEC))
    _, result = finish(tmp_path, spec, key="an-older-config")
    assert finished_result(spec, "pretrain", {}) is None
    assert finished_result(spec, "pretrain", {}, strict=False) == result


@pytest.mark.parametrize("status", ["running", "failed", "interrupted"])
def test_an_unfinished_stage_is_never_reused(tmp_path, monkeypatch, status):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(yaml.safe_dump(SPEC))
    finish(tmp_path, spec)
    record = Path(spec.output_root) / "pretrain" / "stage.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": status}))
    assert finished_result(spec, "pretrain", {}) is None
    record.write_text("{half a record")
    assert finished_result(spec, "pretrain", {}) is None


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmlab.reuse import stage_lock
    with stage_lock(Path(sys.argv[1]), "holder"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
        print("released", time.time(), flush=True)
""")


def test_the_stage_lock_makes_a_second_writer_wait_for_the_first(tmp_path, capsys):
    out = tmp_path / "stage"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with stage_lock(out, "second"):
        acquired = time.time()
    released = float(holder.stdout.readline().split()[1])
    holder.wait(timeout=30)
    assert acquired >= released
    assert "another run is writing" in capsys.readouterr().out
    with stage_lock(out, "third"):  # free again: no waiting
        pass
    assert "another run is writing" not in capsys.readouterr().out


def test_a_second_spec_pointing_a_stage_folder_at_another_config_is_refused_naming_both(tmp_path, monkeypatch):
    from llmlab.preflight import preflight
    from llmlab.reuse import StageFolderTaken
    from llmlab.runners.registry import resolved_config
    from llmlab.spec import config_hash, load_spec
    from llmlab.execute import execute_stage

    monkeypatch.chdir(tmp_path)
    first, second, same = tmp_path / "first.yaml", tmp_path / "second.yaml", tmp_path / "copy.yaml"
    raw = json.loads(json.dumps(SPEC))
    first.write_text(yaml.safe_dump(raw))
    same.write_text(yaml.safe_dump(raw))
    raw["stages"]["pretrain"]["train"]["lr"] = 3e-3
    second.write_text(yaml.safe_dump(raw))
    spec = load_spec(first)
    config = resolved_config(spec, "pretrain")  # what the first spec's run recorded in the folder
    atomic_write_json(tmp_path / "runs" / "keys" / "pretrain" / "stage.json",
                      {"stage": "pretrain", "spec_file": str(first.resolve()), "status": "finished", "config": config,
                       "config_hash": config_hash(config)})
    with pytest.raises(StageFolderTaken) as refused:
        execute_stage(str(second), "pretrain", {}, None)
    message = str(refused.value)
    assert message.startswith("stage 'pretrain': ") and str(first.resolve()) in message and str(second.resolve()) in message
    assert "train.lr: 0.001 -> 0.003" in message and "own `workdir`" in message
    # preflight finds it before any stage runs; the first spec itself, or a copy with its config, is fine
    (problem,) = [p for p in preflight(load_spec(second), second)[0] if p.stage == "pretrain"]
    assert str(first.resolve()) in problem.render() and "train.lr: 0.001 -> 0.003" in problem.render()
    for ok in (first, same):
        assert not [p for p in preflight(load_spec(ok), ok)[0] if p.stage == "pretrain"]


def test_a_conflict_names_each_differing_field_whole():
    from llmlab.reuse import changed_fields

    long_path = "/data/" + "x" * 80 + "/missingcol_all.jsonl"
    old = {"data": [{"path": long_path, "weight": 1}], "train": {"lr": 0.001}}
    new = {"data": [{"path": long_path.replace("missingcol", "fixed"), "weight": 1}], "train": {"lr": 0.002}}
    shown = changed_fields(old, new)
    assert f'data[0].path: "{long_path}" -> "{long_path.replace("missingcol", "fixed")}"' in shown
    assert "train.lr: 0.001 -> 0.002" in shown and "weight" not in shown


def test_sources_parse_again_only_when_a_file_changes(source_copy, monkeypatch, tmp_path):
    import ast

    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    before = versions(source_copy)  # parses every file and keeps what each parsed to
    parsed = []
    real_parse = ast.parse
    monkeypatch.setattr(ast, "parse", lambda text, name="<unknown>", *a, **k: parsed.append(name) or real_parse(text, name, *a, **k))
    assert versions(source_copy) == before and parsed == []  # a new process: nothing parsed again
    target = source_copy / "llmlab" / "runners" / "dpo.py"
    edit(target, "def ", "def _added_helper():\n    return 1\n\n\ndef ")
    after = versions(source_copy)
    assert parsed == [str(target)] and after["dpo"] != before["dpo"] and after["sft"] == before["sft"]
