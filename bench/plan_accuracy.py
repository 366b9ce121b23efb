"""How close `llmlab plan`'s time estimates come to the real stage times.

    .venv/bin/python bench/plan_accuracy.py [--busy] [--json FILE]

In one fresh state directory, for the demo (pipelines/tiny.yaml) and then pipelines/tiny-ppo.yaml,
each in a fresh workdir: `llmlab plan --json` (the estimate, with its range), then `llmlab run`,
then each stage's real seconds (stage.json). The demo is planned with no finished stage on record
(the reference machine's factors and this machine's matmul rate); tiny-ppo after the demo ran, so
the kinds they share are calibrated by the demo's stages. `--busy` keeps one core busy while each
`plan` runs (the matmul rate is measured then). Also prints each FLOP-modelled stage's actual /
FLOP-model ratio: what `llmlab.plan.REFERENCE_FACTORS` holds for the reference machine.

Markdown for docs/benchmarks.md on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}


def _burn(stop_at: float) -> None:
    while time.time() < stop_at:
        sum(i * i for i in range(10000))


def plan(spec: Path, env: dict, cwd: Path, busy: bool) -> list[dict]:
    burner = None
    if busy:
        burner = multiprocessing.Process(target=_burn, args=(time.time() + 120,))
        burner.start()
        time.sleep(1)
    try:
        out = subprocess.run([sys.executable, "-m", "llmlab.cli", "plan", str(spec), "--json"], env=env, cwd=cwd,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if burner is not None:
            burner.terminate()
            burner.join()
    return json.loads(out[out.index("["):])


def model_ratios(spec: Path, env: dict) -> dict[str, float]:
    """actual seconds / FLOP-model seconds of each FLOP-modelled stage (read in a child with this state dir)."""
    code = """
import json, sys
from llmlab.plan import MEASURED_FIXED, _model_seconds, machine_rate, stage_work
from llmlab.spec import load_spec
spec = load_spec(sys.argv[1]); rate = machine_rate(); out = {}
for name in spec.stage_names():
    work = stage_work(spec, name)
    if work is not None:
        record = json.loads((spec.stage_dir(name) / "stage.json").read_text())
        fixed = record.get("metrics", {}).get(MEASURED_FIXED, work.fixed_seconds)  # the harness time it measured
        out[spec.stages[name].kind] = ((record["seconds"] - fixed)
                                       / _model_seconds(work.train_flops, work.decode_flops, rate))
print(json.dumps(out))
"""
    out = subprocess.run([sys.executable, "-c", code, str(spec)], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", action="store_true", help="one core busy while `plan` runs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="llmlab-plan-"))
    env = {**os.environ, **QUIET, "LLMLAB_STATE_DIR": str(folder / "state"), "LLMLAB_PREFECT_IDLE_SECONDS": "0"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    table, ratios = [], {}
    for pipeline in ("tiny.yaml", "tiny-ppo.yaml"):
        raw = yaml.safe_load((ROOT / "pipelines" / pipeline).read_text())
        raw["workdir"] = str(folder / "runs" / pipeline.removesuffix(".yaml"))
        spec = folder / pipeline
        spec.write_text(yaml.safe_dump(raw, sort_keys=False))
        rows = plan(spec, env, folder, args.busy)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(spec)], env=env, cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        for row in rows:
            record = json.loads((Path(raw["workdir"]) / row["stage"] / "stage.json").read_text())
            low, high = row["seconds_range"] or (None, None)
            table.append({"pipeline": pipeline, "stage": row["stage"], "kind": row["kind"], "estimate": row["seconds"],
                          "low": low, "high": high, "actual": record["seconds"], "source": row["estimate_source"]})
        table.append({"pipeline": pipeline, "stage": "(whole run, wall)", "kind": "", "actual": wall,
                      "estimate": sum(r["seconds"] or 0 for r in rows),
                      "low": sum((r["seconds_range"] or [0, 0])[0] for r in rows),
                      "high": sum((r["seconds_range"] or [0, 0])[1] for r in rows), "source": ""})
        ratios[pipeline] = model_ratios(spec, env)
    print(f"plan estimates against the real run, fresh state{' (one core busy during plan)' if args.busy else ''}\n")
    print("| pipeline | stage | estimate (range) s | actual s | actual / estimate | in range | estimate from |")
    print("|---|---|---:|---:|---:|---|---|")
    for r in table:
        est = r["estimate"]
        shown = f"{est:.0f} ({r['low']:.0f}-{r['high']:.0f})" if est else "unknown"
        ratio = f"{r['actual'] / est:.2f}" if est else "–"
        inside = "yes" if est and r["low"] <= r["actual"] <= r["high"] else "no" if est else "–"
        print(f"| {r['pipeline']} | {r['stage']} | {shown} | {r['actual']:.0f} | {ratio} | {inside} | {r['source']} |")
    rates = json.loads((folder / "state" / "machine_rate.json").read_text())
    shown_rates = ", ".join(f"{v['rate'] / 1e9:.0f} GFLOP/s" for v in rates.values())
    print(f"\nmatmul rate measured by plan: {shown_rates}")
    print("\nseconds of the kinds without a FLOP model (what REFERENCE_SECONDS holds for the reference machine): "
          + ", ".join(f"{r['pipeline']} {r['kind']} {r['actual']:.1f}" for r in table
                      if r["kind"] in ("tokenizer", "eval", "merge", "export", "preferences")))
    print("\nactual / FLOP-model seconds per kind (what REFERENCE_FACTORS holds for the reference machine):")
    for pipeline, found in ratios.items():
        print(f"- {pipeline}: " + ", ".join(f"{k} {v:.3g}" for k, v in found.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": table, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
