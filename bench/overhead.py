"""Orchestration and tracking overhead: the tiny pipeline (shortened) four ways, in one run.

    .venv/bin/python bench/overhead.py [--steps 60] [--repeats 2]

1. bare      — the stage runners called directly, MLflow replaced by a no-op (the work itself)
2. tracked   — `llmlab.execute.execute_stage` per stage (MLflow runs, params, metrics, artifacts)
3. flow      — `llmlab run` (a Prefect flow in ephemeral mode, one task per stage), a fresh process
4. cached    — `llmlab run` again: every stage reused

Each configuration gets its own state and output folders; wall times are medians over repeats,
interleaved. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_spec(folder: Path, steps: int) -> Path:
    raw = yaml.safe_load((ROOT / "pipelines/tiny.yaml").read_text())
    raw["workdir"] = str(folder / "runs")
    raw["stages"]["pretrain"]["train"].update(max_steps=steps, warmup_steps=min(10, steps), eval_every=steps,
                                              save_every=steps)
    spec = folder / "tiny.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


BARE = """
import sys, time
from pathlib import Path
from llmlab.spec import load_spec
from llmlab.runners.context import StageContext, StageResult, stage_block, stage_kind
from llmlab.runners.registry import runner

class NullRun:
    run_id = None
    def __getattr__(self, name):
        return lambda *a, **k: None

spec_file = sys.argv[1]
spec = load_spec(spec_file)
results = {}
t0 = time.perf_counter()
for name in spec.stage_names():
    block = stage_block(spec, name)
    deps = [] if name == "tokenizer" else (["tokenizer"] if "tokenizer" in results else []) + block.inputs
    ins = {d: StageResult.from_dict(results[d]) for d in deps}
    out = Path(spec.output_root) / name
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(spec, name, block, out, ins, NullRun())
    outputs, metrics = runner(stage_kind(spec, name))(ctx)
    results[name] = StageResult(name, "", str(out), "", "", None, "finished", outputs, metrics).to_dict()
print(f"SECONDS {time.perf_counter() - t0:.2f}")
"""

TRACKED = """
import sys, time
from llmlab.spec import load_spec
from llmlab.execute import execute_stage
spec_file = sys.argv[1]
spec = load_spec(spec_file)
results = {}
t0 = time.perf_counter()
for name in spec.stage_names():
    deps = [] if name == "tokenizer" else (["tokenizer"] if "tokenizer" in results else []) + spec.stages[name].inputs
    results[name] = execute_stage(spec_file, name, {d: results[d] for d in deps}, None)
print(f"SECONDS {time.perf_counter() - t0:.2f}")
"""


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float | None]:
    """(process wall seconds, seconds the script reported for its stages)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    inner = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("SECONDS ")]
    return wall, (inner[0] if inner else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    base_env.pop("PREFECT_API_URL", None)
    times: dict[str, list[tuple[float, float | None]]] = {k: [] for k in ("bare", "tracked", "flow", "cached")}
    llmlab = [sys.executable, "-m", "llmlab.cli", "run"]
    for _ in range(args.repeats):
        for mode in ("bare", "tracked", "flow"):
            folder = Path(tempfile.mkdtemp(prefix=f"llmlab-overhead-{mode}-"))
            env = {**base_env, "LLMLAB_STATE_DIR": str(folder / "state")}
            spec = write_spec(folder, args.steps)
            if mode == "bare":
                times[mode].append(timed([sys.executable, "-c", BARE, str(spec)], env, folder))
            elif mode == "tracked":
                times[mode].append(timed([sys.executable, "-c", TRACKED, str(spec)], env, folder))
            else:
                times["flow"].append(timed([*llmlab, str(spec)], env, folder))
                times["cached"].append(timed([*llmlab, str(spec)], env, folder))
    print(f"tiny pipeline, pretrain shortened to {args.steps} steps; medians of {args.repeats}; "
          f"fresh state each (first runs include the builtin-text cache and MLflow database creation)\n")
    print("| mode | process wall s | stages s |")
    print("|---|---|---|")
    for mode, rows in times.items():
        wall = statistics.median(r[0] for r in rows)
        inner = [r[1] for r in rows if r[1] is not None]
        print(f"| {mode} | {wall:.1f} | {statistics.median(inner):.1f} |" if inner else f"| {mode} | {wall:.1f} | – |")


if __name__ == "__main__":
    main()
