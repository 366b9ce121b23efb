"""How much each stage of a pipeline improves its model, over seeds and a numerics perturbation.

    .venv/bin/python bench/quality.py [--spec pipelines/tiny.yaml] [--seeds 1 2 3] [--one-thread-seed 1]
                                      [--workdir bench-runs/quality] [--fresh] [--json out.json]
                                      [--set stages.sft.lora.train_embeddings=false ...]

Runs the whole pipeline once per seed (the spec's `seed` replaced), plus once more for
`--one-thread-seed` with one CPU thread instead of all of them: the same seed with another reduction
order, the cheapest stand-in for "another CPU". Each run is a fresh `llmlab run` process with its
own workdir, state dir (Prefect, MLflow) and environment; `--fresh` deletes earlier runs first,
otherwise finished, unchanged stages are reused (handy while tuning one stage's recipe).

Reads the spec's eval stage (`results.json`) of every run and prints, per evaluated model: exact
match overall and per task family, and preference accuracy, as mean / min / max over runs, with
each run's 95% Wilson interval; then each stage's change over the model it started from (sft ->
merge counts as the merge row against pretrain) with its worst run, which is what tests and the
README may claim. Markdown for docs/benchmarks.md on stdout; `--json` keeps everything.

`--set PATH=VALUE` changes one field of the spec (a dotted path, a YAML value; `--set
stages.sft.data='[{path: builtin:tasks}]'`): the recipe's ablations, each measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags) or "no AVX2"


def eval_stage(spec: dict) -> str:
    names = [name for name, stage in spec["stages"].items() if stage.get("kind") == "eval"]
    if not names:
        sys.exit("the spec has no eval stage to read results from")
    return names[-1]


def start_of(spec: dict, name: str) -> str | None:
    """The stage a model-producing stage starts from (its first `from`)."""
    source = spec["stages"][name].get("from")
    return source[0] if isinstance(source, list) else source


def run_one(spec: dict, label: str, seed: int, threads: int, root: Path) -> tuple[dict, float]:
    """One pipeline run in its own folder and process; returns the eval results and the wall time."""
    folder = root / label
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "seed": seed, "workdir": str(folder / "runs")}
    spec_file = folder / "pipeline.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, **QUIET, "LLMLAB_STATE_DIR": str(folder / ".llmlab"), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with (folder / "run.log").open("w") as log:
        done = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(spec_file)], cwd=folder, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"run {label} failed (exit {done.returncode}); see {folder / 'run.log'}")
    results = json.loads((folder / "runs" / eval_stage(spec) / "results.json").read_text())
    return results, seconds


def override(spec: dict, assignment: str) -> None:
    """Set the field at a dotted path (`stages.sft.train.max_steps=300`) to a YAML value."""
    path, _, value = assignment.partition("=")
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node[key]
    node[leaf] = yaml.safe_load(value)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[str, dict], spec: dict) -> dict:
    """Per model: metric -> spread over runs (+ each run's value and interval); per stage: change
    over its starting model -> spread."""
    order = next(iter(runs.values()))["model_order"]
    models, changes = {}, {}
    for model in order:
        per_run = {label: r["models"][model] for label, r in runs.items()}
        entry = {}
        for metric in ("exact_match", "preference_accuracy"):
            if all(metric in m for m in per_run.values()):
                entry[metric] = {**spread([m[metric] for m in per_run.values()]),
                                 "runs": {label: {"value": m[metric], "ci": m.get(f"{metric}_ci")} for label, m in per_run.items()}}
        for metric, key in (("exact_match", "families"), ("preference_accuracy", "preference_families")):
            by = f"{metric}_by_family"
            families = sorted({f for m in per_run.values() for f in m.get(by, {})})
            entry[key] = {f: spread([m[by][f]["value"] for m in per_run.values() if f in m.get(by, {})])
                          for f in families}
            entry[f"{key}_n"] = {f: next(m[by][f]["n"] for m in per_run.values() if f in m.get(by, {}))
                                 for f in families}
        if all("eval/ppl" in m for m in per_run.values()):
            entry["text_ppl"] = {**spread([m["eval/ppl"] for m in per_run.values()]),
                                 "runs": {label: m["eval/ppl"] for label, m in per_run.items()}}
        models[model] = entry
    base = next((m for m in order if spec["stages"].get(m, {}).get("kind") == "pretrain" and "text_ppl" in models[m]), None)
    for model in order:
        if base and "text_ppl" in models[model]:  # held-out text perplexity against the pretrained model's, run by run
            ratios = [models[model]["text_ppl"]["runs"][label] / models[base]["text_ppl"]["runs"][label] for label in runs]
            models[model]["text_ppl"]["over"] = {"model": base, **spread(ratios)}
    for model in order:
        start = start_of(spec, model)
        if spec["stages"][model].get("kind") == "merge" and start:
            start = start_of(spec, start)  # merge stands for the sft stage it merges
        if start not in order and start in spec["stages"] and spec["stages"][start].get("kind") == "merge":
            start = start_of(spec, start)  # a merge not evaluated: the adapters it folds in are the same model
        if start not in order:
            continue
        changes[model] = {"over": start}
        for metric in ("exact_match", "preference_accuracy"):
            if metric in models[model] and metric in models[start]:
                deltas = [runs[label]["models"][model][metric] - runs[label]["models"][start][metric] for label in runs]
                changes[model][metric] = {**spread(deltas), "improved_on_every_run": all(d > 0 for d in deltas)}
    return {"models": models, "changes": changes}


def compact_table(summary: dict) -> list[str]:
    """The README's table: per model, mean (min–max) over the runs of exact match, preference accuracy
    and held-out text perplexity."""
    lines = ["| model | exact match | preference accuracy | held-out text perplexity |", "|---|---|---|---|"]
    for model, entry in summary["models"].items():
        cells = []
        for metric, digits in (("exact_match", 3), ("preference_accuracy", 3), ("text_ppl", 1)):
            m = entry.get(metric)
            cells.append(f"{m['mean']:.{digits}f} ({m['min']:.{digits}f}–{m['max']:.{digits}f})" if m else "–")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, runs: dict, seconds: dict, args, spec: dict, machine: dict | None = None) -> str:
    labels = list(runs)
    first = next(iter(runs.values()))
    machine = machine or {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count()}
    lines = [f"Machine: {machine['cpu']} ({machine['flags']}), {machine['cores']} cores, torch threads per run as labelled. "
             f"Spec `{args.spec}`" + "".join(f", `{a}`" for a in args.set) + f", runs: {', '.join(labels)}. Held-out: {first.get('tasks', {}).get('prompts', '?')} task "
             f"prompts (each once), {first.get('preferences', {}).get('pairs', '?')} preference pairs. "
             f"Wall time per run: {', '.join(f'{s / 60:.1f} min' for s in seconds.values())}.", "",
             "Mean (min–max) over the runs:", "", *compact_table(summary), "",
             "| model | exact match: mean (min–max) | preference accuracy: mean (min–max) | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for model, entry in summary["models"].items():
        em, pa = entry.get("exact_match"), entry.get("preference_accuracy")
        cells = []
        for label in labels:
            r = em["runs"][label] if em else None
            cells.append(f"{r['value']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r and r["ci"] else "–")
        lines.append(f"| {model} | " + (f"{em['mean']:.3f} ({em['min']:.3f}–{em['max']:.3f})" if em else "–") + " | "
                     + (f"{pa['mean']:.3f} ({pa['min']:.3f}–{pa['max']:.3f})" if pa else "–") + " | " + " | ".join(cells) + " |")
    if any("text_ppl" in e for e in summary["models"].values()):
        lines += ["", "Held-out text perplexity (the eval stage's text, which no stage trains on), and each run's ratio "
                  "to the pretrained model's:", "",
                  "| model | perplexity: mean (min–max) | × pretrained: mean (worst run) | " + " | ".join(labels) + " |",
                  "|---|---|---|" + "---|" * len(labels)]
        for model, entry in summary["models"].items():
            ppl = entry.get("text_ppl")
            if not ppl:
                continue
            over = ppl.get("over")
            lines.append(f"| {model} | {ppl['mean']:.1f} ({ppl['min']:.1f}–{ppl['max']:.1f}) | "
                         + (f"{over['mean']:.2f} ({over['max']:.2f})" if over else "–") + " | "
                         + " | ".join(f"{ppl['runs'][label]:.1f}" for label in labels) + " |")
    for key, title in (("families", "Exact match"), ("preference_families", "Preference accuracy")):
        families = sorted({f for e in summary["models"].values() for f in e[key]})
        if not families:
            continue
        n = next(iter(summary["models"].values()))[f"{key}_n"]
        lines += ["", f"{title} per task family, mean (min–max) over runs:", "",
                  "| model | " + " | ".join(f"{f} (n={n.get(f, '?')})" for f in families) + " |",
                  "|---|" + "---|" * len(families)]
        for model, entry in summary["models"].items():
            lines.append(f"| {model} | " + " | ".join(
                f"{entry[key][f]['mean']:.2f} ({entry[key][f]['min']:.2f}–{entry[key][f]['max']:.2f})"
                if f in entry[key] else "–" for f in families) + " |")
    lines += ["", "Each stage against the model it started from (points; worst run is what may be claimed):", "",
              "| stage | over | exact match: mean (worst–best) | preference accuracy: mean (worst–best) | better on every run |",
              "|---|---|---|---|---|"]
    for model, change in summary["changes"].items():
        cells, every = [], []
        for metric in ("exact_match", "preference_accuracy"):
            c = change.get(metric)
            cells.append(f"{100 * c['mean']:+.1f} ({100 * c['min']:+.1f} – {100 * c['max']:+.1f})" if c else "–")
            if c:
                every.append(f"{metric.replace('_', ' ')}: {'yes' if c['improved_on_every_run'] else 'no'}")
        lines.append(f"| {model} | {change['over']} | {cells[0]} | {cells[1]} | {'; '.join(every)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="pipelines/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--one-thread-seed", type=int, default=None,
                        help="also run this seed on one thread (default: the first seed; -1 for none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the seeded runs")
    parser.add_argument("--workdir", default="bench-runs/quality")
    parser.add_argument("--fresh", action="store_true", help="delete earlier runs under --workdir first")
    parser.add_argument("--json", default=None, help="write runs and summary here")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="change one spec field (dotted path, YAML value); repeatable")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="print the tables of a finished bench's --json again, running nothing")
    args = parser.parse_args()
    spec = yaml.safe_load((ROOT / args.spec).read_text() if not Path(args.spec).is_absolute() else Path(args.spec).read_text())
    if args.from_json:
        done = json.loads(Path(args.from_json).read_text())
        print(markdown(done["summary"], done["runs"], done["seconds"], args, spec, done.get("machine")))
        return
    for assignment in args.set:
        override(spec, assignment)
    root = Path(args.workdir).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    plan = [(f"seed {s}", s, args.threads) for s in args.seeds]
    one = args.seeds[0] if args.one_thread_seed is None else args.one_thread_seed
    if one >= 0:
        plan.append((f"seed {one}, 1 thread", one, 1))
    runs, seconds = {}, {}
    for label, seed, threads in plan:
        print(f"[quality] {label} ...", file=sys.stderr, flush=True)
        runs[label], seconds[label] = run_one(spec, label.replace(" ", "-").replace(",", ""), seed, threads, root)
        em = {m: round(r.get("exact_match", float("nan")), 3) for m, r in runs[label]["models"].items()}
        print(f"[quality] {label}: {seconds[label]:.0f} s, exact match {em}", file=sys.stderr, flush=True)
    summary = summarize(runs, spec)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "seconds": seconds, "summary": summary,
                                               "machine": {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count()}},
                                              indent=1))
    print(markdown(summary, runs, seconds, args, spec))


if __name__ == "__main__":
    main()
