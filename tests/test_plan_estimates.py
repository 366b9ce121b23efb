"""`llmlab plan`'s time estimates: a robust matmul rate, calibration by this machine's finished
stages of each kind, and a range (llmlab.plan)."""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmlab import plan
from llmlab.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)  # the demo's workdir (runs/tiny) is empty here
    return tmp_path / "state"


def test_the_rate_is_the_best_of_several_samples_and_is_measured_again_when_old_or_implausible(state):
    rate = plan.machine_rate()
    kept = json.loads((state / "machine_rate.json").read_text())[plan._machine_key()]
    assert rate == kept["rate"] == max(kept["samples"]) and len(kept["samples"]) == plan.RATE_SAMPLES
    for stale in ({"rate": 7.0, "measured": time.time()}, {"rate": 1e11, "measured": time.time() - plan.RATE_MAX_AGE - 1}):
        (state / "machine_rate.json").write_text(json.dumps({plan._machine_key(): stale}))
        assert plan.machine_rate() not in (7.0, 1e11)  # implausibly slow, or a week old: measured again
    (state / "machine_rate.json").write_text(json.dumps({plan._machine_key(): {"rate": 3e10, "measured": time.time()}}))
    assert plan.machine_rate() == 3e10  # recent and plausible: kept


def test_finished_stages_calibrate_their_kind_and_set_the_range(state):
    spec = load_spec(ROOT / "pipelines" / "tiny.yaml")
    (state / "machine_rate.json").parent.mkdir(parents=True, exist_ok=True)
    (state / "machine_rate.json").write_text(json.dumps({plan._machine_key(): {"rate": 5e10, "measured": time.time()}}))
    fresh = plan.estimate_time(spec, "pretrain")
    assert "no finished pretrain stage here yet" in fresh.source
    assert fresh.low == pytest.approx(fresh.seconds / plan.REFERENCE_SPREAD)
    assert fresh.high == pytest.approx(fresh.seconds * plan.REFERENCE_SPREAD)
    plan.record_stage_time(spec, "pretrain", 40.0)
    plan.record_stage_time(spec, "pretrain", 60.0)
    calibrated = plan.estimate_time(spec, "pretrain")  # the same work ran twice here: 40 s and 60 s
    assert calibrated.seconds == pytest.approx(50.0) and "calibrated by 2 finished pretrain stages" in calibrated.source
    assert calibrated.low == pytest.approx(40.0 / 1.5) and calibrated.high == pytest.approx(60.0 * 1.5)
    # the rate cancels out: a machine that reads slower now gives the same calibrated estimate
    (state / "machine_rate.json").write_text(json.dumps({plan._machine_key(): {"rate": 1e10, "measured": time.time()}}))
    assert plan.estimate_time(spec, "pretrain").seconds == pytest.approx(50.0)
    # a kind without a FLOP model (the tokenizer): its past wall times here
    assert plan.stage_work(spec, "tokenizer") is None and plan.stage_work(spec, "eval").decode_flops > 0
    plan.record_stage_time(spec, "tokenizer", 3.0)
    assert plan.estimate_time(spec, "tokenizer").seconds == pytest.approx(3.0)
    rows = plan.plan_run(ROOT / "pipelines" / "tiny.yaml")
    shown = plan.render(rows)
    assert "~50 s (27 s-90 s): " in shown and "stages run, ~" in shown


def test_a_stage_is_calibrated_by_finished_stages_of_its_own_signature_first(state, tmp_path):
    spec = load_spec(ROOT / "pipelines" / "tiny.yaml")  # sft with LoRA
    raw = yaml.safe_load((ROOT / "pipelines" / "tiny.yaml").read_text())
    full = {**raw["stages"]["sft"], "train": {**raw["stages"]["sft"]["train"], "stop_at": 0.35}}
    del full["lora"]
    raw["stages"] = {"pretrain": raw["stages"]["pretrain"], "sft": full}
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    demo = load_spec(tmp_path / "full.yaml")  # sft of every weight, stopped early at stop_at
    assert (plan.signature(spec, "sft"), plan.signature(demo, "sft")) == ("sft+lora", "sft+stop_at")
    (state / "machine_rate.json").parent.mkdir(parents=True, exist_ok=True)
    (state / "machine_rate.json").write_text(json.dumps({plan._machine_key(): {"rate": 5e10, "measured": time.time()}}))
    plan.record_stage_time(demo, "sft", 5.0)
    only_other = plan.estimate_time(spec, "sft")  # no LoRA sft here yet: the stop_at one stands in, scaled
    seconds = {s: plan._model_seconds(w.train_flops, w.decode_flops, 5e10)
               for s, w in (("lora", plan.stage_work(spec, "sft")), ("stop", plan.stage_work(demo, "sft")))}
    ratio = plan.REFERENCE_FACTORS["sft+lora"] / plan.REFERENCE_FACTORS["sft+stop_at"]
    assert only_other.seconds == pytest.approx(5.0 / seconds["stop"] * ratio * seconds["lora"])
    assert "of another kind of run" in only_other.source
    plan.record_stage_time(spec, "sft", 48.0)
    assert plan.estimate_time(spec, "sft").seconds == pytest.approx(48.0) != only_other.seconds
    assert plan.estimate_time(demo, "sft").seconds == pytest.approx(5.0)


def test_an_eval_stage_counts_the_harness_time_of_its_benchmark_documents(state):
    from llmlab.runners.eval import BENCHMARK_DOC_SECONDS

    spec = load_spec(ROOT / "pipelines" / "tiny.yaml")
    block = spec.stages["eval"]
    documents = sum(b.limit or 500 for b in block.benchmarks)
    assert documents and plan.stage_work(spec, "eval").fixed_seconds == pytest.approx(
        len(block.inputs) * documents * BENCHMARK_DOC_SECONDS)


def test_a_tokenizer_that_extracts_its_corpus_first_is_estimated_as_such(state):
    from llmlab.paths import cache_dir

    spec = load_spec(ROOT / "pipelines" / "tiny.yaml")  # trains on builtin:stdlib
    (state / "machine_rate.json").parent.mkdir(parents=True, exist_ok=True)
    (state / "machine_rate.json").write_text(json.dumps({plan._machine_key(): {"rate": plan.REFERENCE_RATE,
                                                                               "measured": time.time()}}))
    assert plan.signature(spec, "tokenizer") == "tokenizer+extracts"
    assert plan.estimate_time(spec, "tokenizer").seconds == pytest.approx(plan.REFERENCE_SECONDS["tokenizer+extracts"])
    plan.record_stage_time(spec, "tokenizer", 5.0)
    (cache_dir("builtin") / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-x.jsonl").write_text("")
    assert plan.signature(spec, "tokenizer") == "tokenizer"  # the corpus is in the cache now
    assert plan.estimate_time(spec, "tokenizer").seconds == pytest.approx(plan.REFERENCE_SECONDS["tokenizer"])


def test_a_stage_is_recorded_under_the_signature_it_started_with(state):
    spec = load_spec(ROOT / "pipelines" / "tiny.yaml")
    plan.record_stage_time(spec, "tokenizer", 4.0, started_as="tokenizer+extracts")
    kept = json.loads((state / plan.CALIBRATION).read_text())[plan._machine_key()]["tokenizer"]
    assert [r["signature"] for r in kept] == ["tokenizer+extracts"]


def test_an_eval_stage_is_calibrated_without_the_harness_seconds_it_measured(state):
    """The harness's time varies apart from the models' work: an eval stage keeps what it measured, so the
    FLOP factor is found without it (an eval stage with no benchmarks gets that factor alone), and the
    next estimate of a stage with benchmarks adds the harness time this machine showed."""
    demo = load_spec(ROOT / "pipelines" / "tiny.yaml")  # benchmarks
    other = load_spec(ROOT / "pipelines" / "tiny-ppo.yaml")  # no benchmarks
    (state / "machine_rate.json").parent.mkdir(parents=True, exist_ok=True)
    (state / "machine_rate.json").write_text(json.dumps({plan._machine_key(): {"rate": 5e10, "measured": time.time()}}))
    modelled = {name: (w, plan._model_seconds(w.train_flops, w.decode_flops, 5e10))
                for name, w in (("demo", plan.stage_work(demo, "eval")), ("other", plan.stage_work(other, "eval")))}
    work, model = modelled["demo"]
    assert work.fixed_seconds > 0 and modelled["other"][0].fixed_seconds == 0
    plan.record_stage_time(demo, "eval", 2 * model + 3 * work.fixed_seconds, metrics={plan.MEASURED_FIXED: 3 * work.fixed_seconds})
    (kept,) = json.loads((state / plan.CALIBRATION).read_text())[plan._machine_key()]["eval"]
    assert kept["fixed_seconds"] == pytest.approx(3 * kept["fixed_model"])
    assert plan.estimate_time(other, "eval").seconds == pytest.approx(2 * modelled["other"][1])
    assert plan.estimate_time(demo, "eval").seconds == pytest.approx(2 * model + 3 * work.fixed_seconds)
