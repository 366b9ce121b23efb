"""Kill-resume at scale: SIGKILL stages at random moments, rerun, and compare every logged loss.

    .venv/bin/python bench/kill_resume.py [--kills 20] [--seed 0] [--workdir bench-runs/kill-resume] [--json out.json]

One small pipeline — pretrain -> sft (LoRA) -> merge -> dpo -> grpo, builtin data — runs once uninterrupted
(the reference), then again in its own workdir while this script kills the whole `llmlab run`
process group with SIGKILL: `--kills` times in all, spread evenly over the four training stages,
each at a random moment (uniform over a window after the stage's first logged step; a kill that
lands after the stage finished does not count and is tried again). After each kill the same
command is started again: it must reuse the finished stages and resume the killed one from its
last checkpoint. At the end the interrupted pipeline runs to completion, and every stage's logged
losses (the last value logged for each step: a resumed stage logs the steps after its checkpoint
again) must equal the reference's exactly, with the same steps. Markdown for docs/benchmarks.md on
stdout; exit code 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
STAGES = ("pretrain", "sft", "dpo", "grpo")


def spec(workdir: Path) -> dict:
    def train(steps: int, **extra) -> dict:
        return {"max_steps": steps, "warmup_steps": 5, "eval_every": 20, "eval_steps": 2, "save_every": 7,
                "log_every": 1, **extra}

    return {
        "name": f"kill-resume-{workdir.name}", "seed": 11, "workdir": str(workdir / "runs"),
        "tokenizer": {"train": {"vocab_size": 512, "max_documents": 1500, "data": [{"path": "builtin:stdlib"}]}},
        "model": {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "n_layers": 2, "max_seq_len": 64,
                  "dropout": 0.1},
        "stages": {
            "pretrain": {"kind": "pretrain", "data": [{"path": "builtin:stdlib"}],
                         "train": train(120, batch_sequences=8, gradient_accumulation_steps=2)},
            "sft": {"kind": "sft", "from": "pretrain", "data": [{"path": "builtin:tasks"}], "max_examples": 2000,
                    "lora": {"preset": "all", "r": 8, "dropout": 0.1}, "train": train(80, batch_sequences=8)},
            "merge": {"kind": "merge", "from": "sft"},
            "dpo": {"kind": "dpo", "from": "merge", "data": [{"path": "builtin:tasks-preference"}], "max_examples": 600,
                    "train": train(60, batch_pairs=4, gradient_accumulation_steps=2)},
            "grpo": {"kind": "grpo", "from": "dpo", "data": [{"path": "builtin:tasks-prompts"}], "reward": "exact_match",
                     "group_size": 4, "max_new_tokens": 8, "eval_prompts": 8, "max_prompts": 400,
                     "train": train(24, rollout_prompts=4, batch_prompts=2, eval_steps=1, save_every=3)},
        },
    }


def start(spec_file: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmlab.cli", "run", str(spec_file)], cwd=spec_file.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)


def prepare(workdir: Path) -> tuple[Path, dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "pipeline.yaml"
    spec_file.write_text(yaml.safe_dump(spec(workdir), sort_keys=False))
    env = {**os.environ, **QUIET, "LLMLAB_STATE_DIR": str(workdir / "state")}
    return spec_file, env


def status(runs: Path, stage: str) -> str | None:
    try:
        return json.loads((runs / stage / "stage.json").read_text())["status"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


def logged_rows(runs: Path, stage: str) -> int:
    try:
        return len((runs / stage / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def losses(runs: Path, stage: str) -> dict[int, dict[str, float]]:
    """step -> every loss-like metric, the last value logged for that step."""
    out: dict[int, dict[str, float]] = {}
    for line in (runs / stage / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if "loss" in k})
    return {step: values for step, values in out.items() if values}


def _trained_since(runs: Path, stage: str, started: float, from_step: int) -> bool:
    """This rerun has logged a training step of its own: metrics.jsonl was rewritten after it started
    (a resumed stage trims the rows past its checkpoint) and holds a step past that checkpoint."""
    metrics = runs / stage / "metrics.jsonl"
    try:
        if metrics.stat().st_mtime < started:
            return False
        return any(json.loads(line)["step"] > from_step for line in metrics.read_text().splitlines())
    except (OSError, ValueError, KeyError):
        return False


def kill_once(spec_file: Path, env: dict, runs: Path, stage: str, window: float, rng: random.Random) -> dict | None:
    """Start the pipeline, wait for `stage` to log its first step, SIGKILL at a random moment of
    the next `window` seconds; the kill's record, or None when the stage finished first."""
    ckpt = runs / stage / "checkpoints" / "latest"
    from_step = int(ckpt.read_text().strip().split("-")[1]) if ckpt.exists() else 0
    started = time.time()
    proc = start(spec_file, env)
    try:  # the window opens at this run's first own training step, not at rows a killed attempt left
        while not (status(runs, stage) == "running" and _trained_since(runs, stage, started, from_step)):
            if proc.poll() is not None:
                return None  # finished (or failed) before the stage ran again
            time.sleep(0.05)
        delay = rng.uniform(0.0, window)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        rows = logged_rows(runs, stage)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if status(runs, stage) != "running":
        return None
    ckpt = runs / stage / "checkpoints" / "latest"
    return {"stage": stage, "after_s": round(delay, 2), "rows_logged": rows,
            "checkpoint": ckpt.read_text().strip() if ckpt.exists() else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, default=40.0, help="seconds after a stage's first step a kill may land in")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "kill-resume")
    ap.add_argument("--keep-reference", action="store_true", help="reuse a finished reference run in --workdir")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    keep = args.keep_reference and all(status(args.workdir / "reference" / "runs", s) == "finished" for s in STAGES)
    shutil.rmtree(args.workdir / "killed", ignore_errors=True)
    if not keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    started = time.time()

    ref_file, ref_env = prepare(args.workdir / "reference")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(ref_file)], cwd=ref_file.parent, env=ref_env,
                          capture_output=True, text=True)  # reuses every stage when kept
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        return 1
    reference_s = time.perf_counter() - t0

    spec_file, env = prepare(args.workdir / "killed")
    runs = spec_file.parent / "runs"
    plan = [STAGES[i * len(STAGES) // args.kills] for i in range(args.kills)]
    kills: list[dict] = []
    misses = 0
    for stage in plan:
        while True:
            record = kill_once(spec_file, env, runs, stage, args.window, rng)
            if record is not None:
                kills.append(record)
                print(f"kill {len(kills)}/{args.kills}: {stage} after {record['after_s']} s "
                      f"({record['rows_logged']} rows logged, latest {record['checkpoint']})", file=sys.stderr, flush=True)
                break
            misses += 1
            if misses > 4 * args.kills:
                print("too many kills landed after their stage finished; raise --window or the stages' steps", file=sys.stderr)
                return 1
            if status(runs, stage) == "finished":  # the stage is done: the next kill goes to a later stage
                break
    final = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(spec_file)], cwd=spec_file.parent, env=env,
                           capture_output=True, text=True)
    reference = {s: losses(args.workdir / "reference" / "runs", s) for s in STAGES}
    resumed = {s: losses(runs, s) for s in STAGES} if final.returncode == 0 else {}
    rows = []
    ok = final.returncode == 0
    for s in STAGES:
        ref, got = reference[s], resumed.get(s, {})
        same = ref == got
        ok &= same
        differing = [step for step in ref if ref[step] != got.get(step)]
        rows.append({"stage": s, "kills": sum(k["stage"] == s for k in kills), "steps": len(ref),
                     "identical": same, "first_difference": differing[0] if differing else None})
    result = {"kills": kills, "stages": rows, "reference_seconds": round(reference_s, 1),
              "total_seconds": round(time.time() - started, 1), "final_returncode": final.returncode, "ok": ok}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"Kill-resume: {len(kills)} SIGKILLs of `llmlab run` at random moments "
          f"(seed {args.seed}, window {args.window:.0f} s), each followed by a rerun; {misses} kills landed after "
          f"their stage had finished and were tried again. Reference run {reference_s:.0f} s; all "
          f"{result['total_seconds']:.0f} s.\n")
    print("| stage | kills | logged steps | losses equal to the uninterrupted run |")
    print("|---|---:|---:|---|")
    for r in rows:
        verdict = "yes, every step" if r["identical"] else f"**no** (first at step {r['first_difference']})"
        print(f"| {r['stage']} | {r['kills']} | {r['steps']} | {verdict} |")
    if final.returncode != 0:
        print(f"\nThe final rerun failed:\n```\n{final.stdout[-2000:]}\n{final.stderr[-2000:]}\n```")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
