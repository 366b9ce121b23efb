"""What a run of a spec would do, before it does it: `llmlab plan SPEC` and `llmlab run --dry-run`.

    rows = plan_run("pipelines/tiny.yaml", force=["dpo"])
    print(render(rows))          # one line per stage: reuse | run | resume | skip, and why

For every stage, in the order the flow runs them: whether its finished output will be reused or the
stage will run, and why — never ran here, the last attempt failed or was interrupted (and from which
checkpoint it resumes), the config fields that changed (old -> new), the input whose output will
change, llmlab's code changed, the output was altered or deleted, or a flag. With the estimated wall
time (the stage's own last duration when it ran here with the same shape, else unknown) and peak
training memory (`llmlab.estimate`). Reads stage folders only; runs and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab.checkpoint import fingerprint, latest_checkpoint
from llmlab.estimate import MEASURED_FIXED, Work, fmt_bytes
from llmlab.reuse import cache_key, changed_fields, folder_conflict
from llmlab.runners.registry import estimate_stage, kind_of, resolved_config
from llmlab.selection import SelectionFailed, choose_branch
from llmlab.spec import Pipeline, config_hash, load_spec

# config fields that change how long a stage takes (a changed lr does not; more steps do)
SHAPE_FIELDS = ("max_steps", "batch_sequences", "batch_pairs", "batch_prompts", "rollout_prompts",
                "gradient_accumulation_steps", "max_seq_len", "group_size", "max_new_tokens", "ppo_epochs")


@dataclass
class PlanRow:
    stage: str
    kind: str
    action: str  # reuse | run | resume | skip | blocked
    reasons: list[str] = field(default_factory=list)
    seconds: float | None = None  # estimated wall time when it runs (None: unknown)
    seconds_range: tuple[float, float] | None = None  # the range the estimate is expected in
    estimate_source: str | None = None  # where `seconds` comes from
    memory: int | None = None  # estimated peak training bytes


def _record(spec: Pipeline, stage: str) -> dict[str, Any] | None:
    try:
        return json.loads((spec.stage_dir(stage) / "stage.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _intact(spec: Pipeline, stage: str, record: dict[str, Any]) -> bool:
    try:
        main = Path(record["outputs"][kind_of(spec, stage).main_output])
    except (KeyError, TypeError):
        return False
    return main.exists() and fingerprint(main) == record.get("fingerprint")


def _shape(config: dict[str, Any]) -> dict[str, Any]:
    train = config.get("train") or {}
    return {k: train.get(k, config.get(k)) for k in SHAPE_FIELDS}


def _why_rerun(spec: Pipeline, stage: str, record: dict[str, Any], inputs: dict[str, dict]) -> list[str]:
    """Why a finished stage's recorded key no longer matches: config, inputs, or code."""
    reasons = []
    config = resolved_config(spec, stage)
    if record.get("config_hash") != config_hash(config):
        reasons.append(f"config changed: {changed_fields(record.get('config') or {}, config)}")
    old_inputs = record.get("inputs") or {}
    for name, result in inputs.items():
        if old_inputs.get(name) != result["fingerprint"]:
            reasons.append(f"input '{name}' changed (output {str(old_inputs.get(name))[:8]} -> {result['fingerprint'][:8]})")
    if not reasons:
        reasons.append("llmlab's code changed since it ran")
    return reasons


def plan_run(spec_file: str | Path, force: list[str] | None = None, only: list[str] | None = None,
             from_stage: str | None = None, sweep: dict[str, dict[str, list]] | None = None) -> list[PlanRow]:
    """One PlanRow per stage and branch, in execution order; see the module docstring. Stage names
    may be written ones (all branches and rounds) or concrete ones; `sweep` narrows as the flow's."""
    spec = load_spec(spec_file)
    order = spec.stage_names()
    starts = spec.expand_names([from_stage]) if from_stage else []
    forced = set(spec.expand_names(force or [])) | (set(order[order.index(starts[0]):]) if starts else set())
    only = spec.expand_names(only or [])
    keep, _ = spec.graph.narrowed(sweep or {})
    results: dict[str, dict | None] = {}  # a stage's result as its dependants will see it; None = not known yet
    rows = []
    for name in order:
        kind = kind_of(spec, name).name
        row = PlanRow(name, kind, "run")
        if name != "tokenizer" and name not in keep:
            rows.append(PlanRow(name, kind, "skip", ["not among the sweep values asked for"]))
            results[name] = None
            continue
        selection = spec.selection(name)
        chosen = None
        if selection is not None:
            judged = {b: results[b] for b in selection.options if results.get(b) is not None}
            if len(judged) == len(selection.options):
                try:
                    chosen = choose_branch(spec, name, judged).winner  # type: ignore[arg-type]
                except SelectionFailed:
                    pass
        bound = spec.dependencies(name, chosen)
        deps = list(bound)
        record = _record(spec, name)
        conflict = folder_conflict(spec_file, spec, name)
        pending = [d for d in deps if results.get(bound[d]) is None]
        if selection is not None and chosen is None:
            pending = [f"{selection.stage}'s branches (the selection)"]
        if conflict:
            row.action, row.reasons = "blocked", [conflict.split(": ", 1)[1]]
        elif only and name not in only:
            intact = record is not None and record.get("status") == "finished" and _intact(spec, name, record)
            row.action = "skip" if intact else "blocked"
            row.reasons = ["--only: its recorded output is used" if intact else "--only: it has no finished output to use"]
        elif name in forced:
            row.reasons = ["forced (--force / --from): runs from step 0"]
        elif record is None:
            row.reasons = ["never ran in this workdir"]
        elif record.get("status") != "finished":
            ckpt = latest_checkpoint(spec.stage_dir(name) / "checkpoints")
            if ckpt is not None and record.get("config_hash") == config_hash(resolved_config(spec, name)):
                row.action, row.reasons = "resume", [f"last attempt {record.get('status')}; resumes from {ckpt.name}"]
            else:
                row.reasons = [f"last attempt {record.get('status')}" + (f": {record['error']}" if record.get("error") else "")]
        elif pending:
            row.reasons = [f"input '{d}' runs again, so its output may change" for d in pending]
        else:
            inputs = {d: results[bound[d]] for d in deps}
            key = cache_key(spec, name, inputs)  # type: ignore[arg-type]
            if record.get("cache_key") != key:
                row.reasons = _why_rerun(spec, name, record, inputs)  # type: ignore[arg-type]
            elif not _intact(spec, name, record):
                row.reasons = ["its output was deleted or altered since it finished"]
            else:
                row.action, row.reasons = "reuse", ["same config, inputs and code; output intact"]
        if selection is not None:
            row.reasons.append(f"takes the branch {spec.variant(chosen).label} of '{selection.stage}'" if chosen else
                               f"takes the best branch of '{selection.stage}' by {selection.mode} {selection.metric} once they ran")
        results[name] = record.get("result") if row.action in ("reuse", "skip") and record else None
        if row.action in ("run", "resume"):
            _estimate(spec, name, record, row)
        rows.append(row)
    return rows


# what a small model's training step reaches of this machine's measured fp32 matmul rate (the
# demo's stages on 2 CPU cores: ~0.2-0.35; decoding in RL stages far less, counted separately)
TRAIN_EFFICIENCY = 0.25
DECODE_EFFICIENCY = 0.03
RATE_SAMPLES, RATE_SAMPLE_SECONDS = 5, 0.06  # the matmul rate: the best of a few short samples (a busy moment reads low)
RATE_MAX_AGE = 7 * 24 * 3600  # re-measured after a week, and whenever the kept value is implausible
CALIBRATION = "calibration.json"  # state dir: per machine and kind, the work and seconds of finished stages
KEEP_RECORDS = 30  # per machine and kind
# A machine with no finished stage of a kind yet: actual / FLOP-model seconds on the reference machine
# (bench/plan_accuracy.py; docs/benchmarks.md), and for kinds without a FLOP model the reference
# machine's seconds for the demo's stage of that kind, scaled by the two machines' matmul rates.
REFERENCE_RATE = 228e9
# (sft without either mark and sft+stop_at: bench/plan_accuracy.py on an unpacked LoRA sft and on a
# full-weight sft stopped at a held-out loss, which neither shipped pipeline runs; preferences: not
# measured, they take grpo's)
REFERENCE_FACTORS = {"pretrain": 0.57, "sft+stop_at": 0.055, "sft+lora": 0.70, "sft": 0.113, "dpo": 0.136,
                     "grpo": 0.156, "reward": 0.077, "ppo": 0.121, "eval": 0.196, "preferences": 0.156}
REFERENCE_SECONDS = {"tokenizer+extracts": 4.2, "tokenizer": 0.8, "merge": 0.1, "export": 1.0}  # export: not measured
REFERENCE_SPREAD = 2.0  # the range around an estimate from the reference machine: / and x this
CALIBRATED_SPREAD = 1.5  # around the fastest and slowest factor this machine's records show


def _machine_key() -> str:
    import os

    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("LLMLAB_THREADS") or os.cpu_count()
    gpu = Path("/dev/nvidiactl").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""
    return f"{os.uname().machine}-{os.cpu_count()}-{threads}-{gpu}"


def machine_rate() -> float:
    """This machine's fp32 matmul rate in FLOP/s for torch's threads (one thread's, times their
    number): the best of a few short samples (~0.3 s, which imports torch), kept in the state dir
    under a key read without torch, and measured again when a week old or implausible."""
    import time

    from llmlab.checkpoint import atomic_write_json
    from llmlab.paths import state_dir

    key = _machine_key()
    cache = state_dir() / "machine_rate.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    kept = known.get(key)
    if isinstance(kept, dict) and 1e8 < kept.get("rate", 0) < 1e17 and time.time() - kept.get("measured", 0) < RATE_MAX_AGE:
        return float(kept["rate"])
    import torch

    # one thread, times the threads a stage uses: several threads on a busy machine wait on each
    # other and read up to ten times slow, one thread only as slow as its share of a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 512
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        rates = []
        for _ in range(RATE_SAMPLES):
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < RATE_SAMPLE_SECONDS:
                a @ b
                runs += 1
            rates.append(2 * n**3 * runs / (time.perf_counter() - started) * threads)
    finally:
        torch.set_num_threads(threads)
    rate = max(rates)
    atomic_write_json(cache, {**known, key: {"rate": rate, "measured": time.time(), "samples": rates}})
    return rate


def stage_work(spec: Pipeline, name: str) -> Work | None:
    """A stage's compute over its whole run, as its kind's record counts it (`llmlab.estimate.Work`);
    None for a stage that trains nothing or whose model's size is unknown here."""
    if name == "tokenizer":
        return None
    kind = kind_of(spec, name)
    if kind.work is None:
        return None
    est = kind.estimate(spec, name)
    if est is None:  # a kind that trains nothing but computes (eval): the size of the model it scores
        from types import SimpleNamespace

        from llmlab.estimate import stage_model
        from llmlab.model.memory import count_parameters

        source = stage_model(spec, name)
        if source.shape is None:
            return None
        est = SimpleNamespace(params=count_parameters(source.shape), seq_len=source.shape.max_context)
    if est.params is None:
        return None
    return kind.work(spec.stages[name], est)


BUILTIN_CORPORA = ("builtin:stdlib", "builtin:pydocs")  # extracted from this Python's sources on first use


def signature(spec: Pipeline, name: str) -> str:
    """What calibrates a stage's estimate: its kind, and whether it trains LoRA adapters (a cheaper
    backward) or may stop early at `stop_at` (fewer steps than its FLOPs count); a tokenizer stage,
    whether it first extracts a built-in corpus."""
    kind = kind_of(spec, name).name
    if name == "tokenizer":  # extracting a built-in corpus the first time takes longer than training on it
        from llmlab.data.builtin import extracted

        corpora = [s.path.removeprefix("builtin:") for s in spec.tokenizer.train.data if s.path in BUILTIN_CORPORA]
        return kind + ("+extracts" if not all(extracted(c) for c in corpora) else "")
    block = spec.stages.get(name)
    lora = getattr(block, "lora", None) is not None
    stop = getattr(getattr(block, "train", None), "stop_at", None) is not None
    return kind + ("+lora" if lora else "") + ("+stop_at" if stop else "")


def _model_seconds(train_flops: float, decode_flops: float, rate: float) -> float:
    return train_flops / (rate * TRAIN_EFFICIENCY) + decode_flops / (rate * DECODE_EFFICIENCY)


def _calibration() -> dict[str, Any]:
    from llmlab.paths import state_dir

    try:
        return json.loads((state_dir(create=False) / CALIBRATION).read_text())
    except (OSError, ValueError):
        return {}


def record_stage_time(spec: Pipeline, name: str, seconds: float, started_as: str | None = None,
                      metrics: dict[str, float] | None = None) -> None:
    """Keep a finished stage's work and wall time, which later estimates of its kind on this
    machine are calibrated with; `started_as` is its signature when it started (a tokenizer's
    changes once it has extracted its corpus). The work's fixed seconds (an eval stage's harness
    time) are kept as the stage measured them (`metrics[MEASURED_FIXED]`) beside the modelled ones:
    the FLOP factor is calibrated without them, and the fixed part by their ratio. Never fails a stage."""
    import time

    from llmlab.checkpoint import atomic_write_json
    from llmlab.paths import state_dir

    try:
        work = stage_work(spec, name)
        kind = kind_of(spec, name).name
        known = _calibration()
        records = known.setdefault(_machine_key(), {}).setdefault(kind, [])
        measured = (metrics or {}).get(MEASURED_FIXED) if work and work.fixed_seconds else None
        records.append({"seconds": float(seconds), "at": time.time(), "signature": started_as or signature(spec, name),
                        **({"train_flops": work.train_flops, "decode_flops": work.decode_flops,
                            "fixed_seconds": float(measured) if measured is not None else work.fixed_seconds,
                            "fixed_model": work.fixed_seconds} if work else {})})
        del records[:-KEEP_RECORDS]
        atomic_write_json(state_dir() / CALIBRATION, known)
    except Exception as exc:  # noqa: BLE001 — an estimate's bookkeeping
        print(f"warning: [{name}] its time was not kept for plan's estimates ({type(exc).__name__}: {exc})")


@dataclass
class TimeEstimate:
    seconds: float
    low: float
    high: float
    source: str


def _reference(sig: str) -> float:
    return REFERENCE_FACTORS.get(sig, REFERENCE_FACTORS.get(sig.split("+")[0], 1.0))


def estimate_time(spec: Pipeline, name: str) -> TimeEstimate | None:
    """How long a stage will take here: its kind's FLOP model at this machine's matmul rate, times
    the factor this machine's finished stages of that kind showed — those of the same signature
    (LoRA, stop_at) first — else the reference machine's, with the range those factors span; a kind
    without a FLOP model from its past wall times here (else the reference machine's, scaled by
    matmul rate). None when nothing is known."""
    from statistics import median

    kind = kind_of(spec, name).name
    sig = signature(spec, name)
    records = _calibration().get(_machine_key(), {}).get(kind, [])
    own = [r for r in records if r.get("signature") == sig]
    work = stage_work(spec, name)
    if work is not None:
        rate = machine_rate()
        base = _model_seconds(work.train_flops, work.decode_flops, rate)
        flops = f"{work.train_flops + work.decode_flops:.2g} FLOPs"
        # another signature's records stand in, scaled by the two signatures' reference factors
        factors = [(r["seconds"] - r.get("fixed_seconds", 0.0)) / m * _reference(sig) / _reference(r.get("signature", kind))
                   for r in own or records if "train_flops" in r
                   for m in [_model_seconds(r["train_flops"], r["decode_flops"], rate)] if m > 0]
        factors = [f for f in factors if f > 0]
        # the fixed part (an eval stage's harness time) as this machine measured it against the model
        fixed_ratios = [r["fixed_seconds"] / r["fixed_model"] for r in records if r.get("fixed_model")]
        fixed = work.fixed_seconds * (median(fixed_ratios) if fixed_ratios and work.fixed_seconds else 1.0)
        if factors:
            n = len(factors)
            return TimeEstimate(base * median(factors) + fixed, base * min(factors) / CALIBRATED_SPREAD + fixed,
                                base * max(factors) * CALIBRATED_SPREAD + fixed,
                                f"{flops}, calibrated by {n} finished {kind} stage{'s' if n != 1 else ''} here"
                                + ("" if own else " (of another kind of run: LoRA or stop_at)"))
        f = _reference(sig)
        return TimeEstimate(base * f + work.fixed_seconds, base * f / REFERENCE_SPREAD + work.fixed_seconds,
                            base * f * REFERENCE_SPREAD + work.fixed_seconds,
                            f"{flops} at this machine's {rate / 1e9:.0f} GFLOP/s, the reference machine's factor "
                            f"(no finished {kind} stage here yet)")
    def past(found: list[dict]) -> TimeEstimate:
        seconds = [r["seconds"] for r in found]
        return TimeEstimate(median(seconds), min(seconds) / CALIBRATED_SPREAD, max(seconds) * CALIBRATED_SPREAD,
                            f"{len(seconds)} finished {kind} stage{'s' if len(seconds) != 1 else ''} here")

    if own:
        return past(own)
    reference = REFERENCE_SECONDS.get(sig, REFERENCE_SECONDS.get(kind))
    if reference is not None:
        s = reference * REFERENCE_RATE / machine_rate()
        return TimeEstimate(s, s / REFERENCE_SPREAD, s * REFERENCE_SPREAD,
                            f"the reference machine's {kind} stage, scaled by matmul rate")
    return past(records) if records else None


def _estimate(spec: Pipeline, name: str, record: dict[str, Any] | None, row: PlanRow) -> None:
    est = estimate_stage(spec, name)
    row.memory = est.total if est is not None else None
    last = (record or {}).get("result") or {}
    if record and last.get("seconds") and _shape(record.get("config") or {}) == _shape(resolved_config(spec, name)):
        s = float(last["seconds"])
        row.seconds, row.seconds_range, row.estimate_source = s, (s / 1.25, s * 1.25), "its last run here, same shape"
        return
    found = estimate_time(spec, name)
    if found is not None:
        row.seconds, row.seconds_range, row.estimate_source = found.seconds, (found.low, found.high), found.source


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render(rows: list[PlanRow]) -> str:
    width = max(len(r.stage) for r in rows)
    lines = []
    for r in rows:
        cost = ""
        if r.action in ("run", "resume"):
            when = ("time unknown" if r.seconds is None else
                    f"~{_span(r.seconds)}" + (f" ({_span(r.seconds_range[0])}-{_span(r.seconds_range[1])})"
                                              if r.seconds_range else "") + f": {r.estimate_source}")
            cost = f"  [{when}" + (f"; peak ~{fmt_bytes(r.memory)}" if r.memory else "") + "]"
        lines.append(f"  {r.stage:<{width}}  {r.action:<7} {r.kind:<10} {'; '.join(r.reasons)}{cost}")
    runs = [r for r in rows if r.action in ("run", "resume")]
    timed = [r for r in runs if r.seconds is not None]
    unknown = len(runs) - len(timed)
    total = f"{len(runs)} of {len(rows)} stages run"
    if timed:
        low = sum(r.seconds_range[0] if r.seconds_range else r.seconds for r in timed)
        high = sum(r.seconds_range[1] if r.seconds_range else r.seconds for r in timed)
        total += f", ~{_span(sum(r.seconds for r in timed))} ({_span(low)}-{_span(high)})"
    total += f" + {unknown} of unknown time" if unknown else ""
    blocked = [r.stage for r in rows if r.action == "blocked"]
    return "\n".join(lines + [total + (f"; blocked: {', '.join(blocked)}" if blocked else "")])


def as_json(rows: list[PlanRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def all_reused(spec_file: str | Path, sweep: dict[str, dict[str, list]] | None = None) -> dict[str, dict] | None:
    """Every stage's recorded result (marked reused) when a run would reuse them all — same keys as
    the flow's cache, outputs intact — else None. Decided from the stage folders alone (no Prefect,
    no MLflow, no torch), so such a run can answer at once."""
    spec = load_spec(spec_file)
    rows = plan_run(spec_file, sweep=sweep)
    if any(row.action != "reuse" and not (row.action == "skip" and row.stage not in spec.graph.narrowed(sweep or {})[0])
           for row in rows):
        return None
    results = {}
    for row in rows:
        if row.action == "reuse":
            record = _record(spec, row.stage) or {}
            if not record.get("result"):
                return None
            results[row.stage] = {**record["result"], "reused": True}
    return results or None
