"""What llmlab costs around the work: command latency, reruns, one stage alone, peak memory.

    .venv/bin/python bench/overhead.py [--repeats 3] [--steps 60]

In one run, on the demo pipeline (pipelines/tiny.yaml, pretrain shortened to --steps), in a fresh
state directory and with nothing else running:

- commands: `llmlab --help`, `validate`, `inspect`, `plan` and `runs` on the demo spec, wall time
  (median of --repeats).
- first run: `llmlab run` in a fresh state (it starts the local Prefect server), wall time.
- reused rerun: `llmlab run` again with every stage finished: the wall time until it answers, and
  until its background recording (the Prefect flow run and MLflow parent run) has finished.
- one stage: `llmlab run --only sft --force sft` (the local server warm, as after a failure): the
  stage runs in the command's process while a background flow records it; its wall time, when the
  background recording ended, the stage's own time (`stage.json` seconds: its data, model, training and outputs), its
  training loop (`train/seconds`), and the rest; against, in the same
  run, a bare script that imports torch, transformers and peft and loads the same model (its process's
  wall time, as llmlab's is timed, and the part inside Python), and a bare
  training script that also trains the same steps with AdamW on batches of the same size and mean
  padded length (from the stage's logged tokens/s), with the stage's LoRA adapters (peft, every
  projection, the embedding rows too when the stage trains them) when it has any; peak RSS of the llmlab process and of the bare
  training script.

Markdown for docs/benchmarks.md on stdout; --json keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}

BARE_LOAD = """
import sys, time
t0 = time.perf_counter()
import torch, transformers, peft
from transformers import AutoModelForCausalLM
import llmlab.model.model  # the llmlab architecture, as any script loading this model needs
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(f"SECONDS {time.perf_counter() - t0:.3f}")
"""

BARE_TRAIN = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, peft
from transformers import AutoModelForCausalLM
import llmlab.model.model
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
steps, batch, seq, lora = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
if lora:  # the stage's adapters, as a hand-written peft script sets them up
    projections = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and "lm_head" not in name})
    extra = {"trainable_token_indices": list(range(model.config.vocab_size))} if lora.get("train_embeddings") else {}
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                       target_modules=projections, task_type="CAUSAL_LM", **extra))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
g = torch.Generator().manual_seed(0)
started = time.perf_counter()
for _ in range(steps):
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(f"SECONDS {time.perf_counter() - t0:.3f}")
print(f"TRAIN {time.perf_counter() - started:.3f}")
"""


def run(cmd: list[str], env: dict, cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of the process itself, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss * 1024, out


def reported(out: str, key: str = "SECONDS") -> float:
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith(key + " ")))


def wait_for(pid: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} still runs")


def write_spec(folder: Path, steps: int) -> Path:
    raw = yaml.safe_load((ROOT / "pipelines/tiny.yaml").read_text())
    raw["workdir"] = str(folder / "runs")
    raw["stages"]["pretrain"]["train"].update(max_steps=steps, warmup_steps=min(10, steps), eval_every=steps,
                                              save_every=steps)
    raw["stages"]["sft"]["train"].update(max_steps=40, eval_every=20, save_every=40)
    raw["stages"]["dpo"]["train"].update(max_steps=10, eval_every=10, save_every=10)
    raw["stages"]["grpo"]["train"].update(max_steps=6, warmup_steps=1, eval_every=6, save_every=6)
    raw["stages"]["eval"]["benchmarks"] = [{**b, "limit": 20} for b in raw["stages"]["eval"].get("benchmarks", [])]
    spec = folder / "tiny.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="llmlab-overhead-"))
    env = {**os.environ, **QUIET, "LLMLAB_STATE_DIR": str(folder / "state"), "LLMLAB_PREFECT_IDLE_SECONDS": "600"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    spec = write_spec(folder, args.steps)
    llmlab = [sys.executable, "-m", "llmlab.cli"]
    rows: dict[str, float] = {}
    try:
        rows["first run (fresh state; starts the local Prefect server)"], _, _ = run([*llmlab, "run", str(spec)], env, folder)
        for name, cmd in {"llmlab --help": ["--help"], "llmlab validate": ["validate", str(spec)],
                          "llmlab inspect": ["inspect", str(spec)], "llmlab plan": ["plan", str(spec)],
                          "llmlab runs": ["runs"]}.items():
            rows[name] = statistics.median(run([*llmlab, *cmd], env, folder)[0] for _ in range(args.repeats))
        answers, recorded = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            wall, _, out = run([*llmlab, "run", str(spec)], env, folder)
            wait_for(int(re.search(r"in the background \(process (\d+)", out).group(1)))
            answers.append(wall)
            recorded.append(time.perf_counter() - t0)
        rows["reused rerun: answered"] = statistics.median(answers)
        rows["reused rerun: recorded in Prefect and MLflow (background)"] = statistics.median(recorded)
        model = folder / "runs" / "pretrain" / "model"
        sft = yaml.safe_load(spec.read_text())["stages"]["sft"]["train"]
        lora = yaml.safe_load(spec.read_text())["stages"]["sft"].get("lora")
        if lora:
            lora = {"r": 8, "alpha": 16, "dropout": 0.05, **lora}  # LoraSpec's defaults where the spec is silent
            assert lora.get("preset", "all") == "all", "the bare script adapts every projection, as preset all does"
        seq = yaml.safe_load(spec.read_text())["model"]["max_seq_len"]
        only, bare, bare_inner, train, only_rss, train_rss, train_inner, only_recorded = [], [], [], [], [], [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            wall, rss, out = run([*llmlab, "run", str(spec), "--only", "sft", "--force", "sft"], env, folder)
            wait_for(int(re.search(r"background process \(pid (\d+)", out).group(1)))  # its flow, before timing more
            only_recorded.append(time.perf_counter() - t0)
            record = json.loads((folder / "runs" / "sft" / "stage.json").read_text())
            only.append((wall, record["metrics"]["train/seconds"], int(record["metrics"]["train/steps"]),
                         record["seconds"]))
            only_rss.append(rss)
            # a whole process, timed as llmlab's is: Python's own start and exit count for both
            bare_wall, _, bare_out = run([sys.executable, "-c", BARE_LOAD, str(model)], env, folder)
            bare.append(bare_wall)
            bare_inner.append(reported(bare_out))
            steps = only[-1][2]
            # the stage's batches are padded to their longest example: the bare script trains on that mean length
            logged = [json.loads(line) for line in (folder / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
            tokens = statistics.median(r["train/tokens_per_sec"] for r in logged if "train/tokens_per_sec" in r)
            length = max(8, min(seq, round(tokens * only[-1][1] / steps / sft["batch_sequences"])))
            wall_t, rss_t, out_t = run([sys.executable, "-c", BARE_TRAIN, str(model), str(steps),
                                        str(sft["batch_sequences"]), str(length), json.dumps(lora)], env, folder)
            train.append(wall_t)
            train_rss.append(rss_t)
            train_inner.append(reported(out_t, "TRAIN"))
        rows["--only sft --force sft: wall"] = statistics.median(o[0] for o in only)
        rows["--only sft: the stage (data, model, training, outputs: stage.json seconds)"] = statistics.median(
            o[3] for o in only)
        rows["--only sft: its training loop (train/seconds)"] = statistics.median(o[1] for o in only)
        rows["--only sft: everything else"] = statistics.median(o[0] - o[3] for o in only)
        rows["--only sft: recorded in Prefect and MLflow (background flow, from the start)"] = statistics.median(only_recorded)
        rows["bare script: import torch, transformers, peft; load the model"] = statistics.median(bare)
        rows["bare script: the same, inside Python (after its start, before its exit)"] = statistics.median(bare_inner)
        rows["bare training script: the same, then the same steps (wall)"] = statistics.median(train)
        rows["bare training script: everything but its training loop"] = statistics.median(
            w - t for w, t in zip(train, train_inner))
        peak = {"llmlab run --only sft (peak RSS, MiB)": statistics.median(only_rss) / 2**20,
                "bare training script (peak RSS, MiB)": statistics.median(train_rss) / 2**20}
    finally:
        subprocess.run([*llmlab, "stop"], env=env, cwd=folder, capture_output=True)
    print(f"demo pipeline, pretrain {args.steps} steps, sft 40; medians of {args.repeats}; one state directory\n")
    print("| what | seconds |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} |")
    print("\n| process | peak RSS (MiB) |\n|---|---:|")
    for name, value in peak.items():
        print(f"| {name} | {value:.0f} |")
    overhead = rows["--only sft: everything else"] / rows["bare script: import torch, transformers, peft; load the model"]
    print(f"\n--only sft outside the stage: {overhead:.2f}x the bare script; peak RSS "
          f"{peak['llmlab run --only sft (peak RSS, MiB)'] / peak['bare training script (peak RSS, MiB)']:.2f}x the "
          f"bare training script")
    if args.json:
        args.json.write_text(json.dumps({"seconds": rows, "rss_mib": peak}, indent=1))


if __name__ == "__main__":
    main()
