#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md quotes, on one CUDA machine, in one command:
#
#   bash bench/gpu_session.sh OUT_DIR                      # all parts, about 15 minutes on an H100
#   bash bench/gpu_session.sh OUT_DIR env bench tests      # some parts (in this order when given)
#
# Parts, each under its own time limit, each writing OUT_DIR/<part>.log and a line to OUT_DIR/summary.txt:
#   env    llmlab env --probe: versions, the card, and whether compile and graph capture work here
#   bench  bench/gpu.py at the 152M shape: llmlab's loop (eager / chunked / compiled) against
#          transformers' Llama in the same run, and decoding against generate() (OUT_DIR/gpu.json)
#   tests  pytest -m gpu: the tests that need a CUDA card
#   demo   the default pipeline (pipelines/tiny.yaml) on the card; its eval results in OUT_DIR/demo.json
#   152m   pipelines/gpu-152m.yaml (pretrain -> sft -> grpo -> eval at 152M parameters); each stage's
#          time, speed, MFU and which fast paths ran in OUT_DIR/152m.json
# Runs from a checkout (PYTHONPATH=.) with llmlab's dependencies and a CUDA build of torch installed
# (README: "Installing for a GPU"); offline. A part that fails or runs out of time does not stop the
# others. PYTHON picks the interpreter (default python3).
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [env] [bench] [tests] [demo] [152m]}
shift
parts=${*:-env bench tests demo 152m}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root" || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export LLMLAB_STATE_DIR=${LLMLAB_STATE_DIR:-$root/.llmlab-gpu}

part() {  # part NAME SECONDS COMMAND...: run under a limit, log, and note rc and wall time
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - start)) s$([ "$rc" = 124 ] && echo " (time limit $limit s)")" | tee -a "$out/summary.txt"
}

stage_summary() {  # each stage of a run folder: time, fast paths, median speed and MFU, peak memory, final metrics
  "$py" - "$1" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = {}
for record in sorted(Path(sys.argv[1]).glob("*/stage.json")):
    r, rows = json.loads(record.read_text()), []
    log = record.parent / "metrics.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    s = {"status": r.get("status"), "seconds": r.get("seconds"), "fast_paths": r.get("fast_paths")}
    for key in ("train/tokens_per_sec", "train/mfu", "rl/rollout_tokens_per_sec"):
        values = [row[key] for row in rows if key in row][1:]  # the first window holds compilation
        if values:
            s[f"median {key}"] = statistics.median(values)
    for key, pick in (("train/peak_memory_gib", max), ("train/compile_seconds", min)):
        values = [row[key] for row in rows if key in row]
        if values:
            s[key] = pick(values)
    s["final"] = {k: v for k, v in (r.get("metrics") or {}).items() if k.startswith(("eval/", "train/steps"))}
    out[record.parent.name] = s
results = Path(sys.argv[1]) / "eval" / "results.json"
if results.is_file():
    out["eval results"] = json.loads(results.read_text()).get("models")
print(json.dumps(out, indent=1))
EOF
}

echo "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)" \
  | tee -a "$out/summary.txt"
for p in $parts; do
  case $p in
    env) part env 180 "$py" -m llmlab.cli env --probe ;;
    bench) part bench 420 "$py" bench/gpu.py --json "$out/gpu.json" ;;
    tests) part tests 300 "$py" -m pytest -q -m gpu -p no:cacheprovider tests ;;
    demo)
      part demo 420 "$py" -m llmlab.cli run pipelines/tiny.yaml
      stage_summary runs/tiny >"$out/demo.json" ;;
    152m)
      part 152m 560 "$py" -m llmlab.cli run pipelines/gpu-152m.yaml
      stage_summary runs/gpu-152m >"$out/152m.json" ;;
    *) echo "unknown part '$p': choose from env bench tests demo 152m" >&2; exit 2 ;;
  esac
done
