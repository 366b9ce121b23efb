"""The shipped demo, as `make demo` runs it: instruction tuning must teach the tasks, and alignment
must not undo it.

Margins come from `bench/quality.py` over seeds 1, 2, 3 and a one-thread run (docs/benchmarks.md):
sft's worst run reached exact match 0.711 (floor here 0.45) and +21 points of preference accuracy
(here +15); dpo moved exact match by -0.5 to +4.4 points and preference accuracy by +0.0 to +1.0,
grpo exact match by +0.0 to +2.5 and preference accuracy by -1.0 to +0.5, so they may lose at most
ALIGNMENT_SLACK (5 points) — their direction is the bench's to report, not a strict assertion that
one prompt of 204 would flip. grpo also must not end below its start on its own validation prompts:
it evaluates the dpo model first and keeps it when no step beats it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SFT_MIN_EM = 0.45  # sft exact match, absolute (the quality issue's floor; worst measured run 0.711)
ALIGNMENT_SLACK = 0.05  # dpo and grpo may not lose more than this against the model they start from


def test_the_demo_improves_its_model_at_every_stage(tmp_path):
    raw = yaml.safe_load((ROOT / "pipelines" / "tiny.yaml").read_text())
    raw["workdir"] = str(tmp_path / "runs")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "LLMLAB_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    models = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())["models"]
    em = {m: v["exact_match"] for m, v in models.items()}
    pa = {m: v["preference_accuracy"] for m, v in models.items()}
    shown = f"exact match {em}, preference accuracy {pa}"
    assert em["pretrain"] == 0.0 and em["sft"] >= SFT_MIN_EM, shown
    assert pa["sft"] > pa["pretrain"], shown
    assert pa["sft"] >= pa["pretrain"] + 0.15, shown  # worst measured run: +21 points
    assert pa["dpo"] >= pa["sft"] - ALIGNMENT_SLACK and em["dpo"] >= em["sft"] - ALIGNMENT_SLACK, shown
    assert em["grpo"] >= em["dpo"] - ALIGNMENT_SLACK, shown
    grpo = [json.loads(line) for line in (tmp_path / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    held_out = {r["step"]: r["eval/exact_match"] for r in grpo if "eval/exact_match" in r and "step" in r}
    final = json.loads((tmp_path / "runs" / "grpo" / "stage.json").read_text())["metrics"]
    # the start model was a candidate, and the exported model is the best evaluated one
    assert 0 in held_out and final["eval/exact_match"] == max(held_out.values()) >= held_out[0], (held_out, final)
