"""The shipped demo, as `make demo` runs it: instruction tuning must teach the tasks, preference
optimisation must raise both preference accuracy and exact match, and grpo must not undo it.

Margins come from `bench/quality.py` (docs/benchmarks.md), taken below each worst run so they hold on
other CPUs. sft (unchanged since the fourth session): worst exact match 0.242 on an AMD EPYC and 0.220
on an Intel Xeon (seed 3, one thread; floor here 0.20), worst preference gain over pretrain +7.8 points
(here +5). dpo, with its pairs weighted to the plus family (seventh session; Intel Xeon, seeds 1, 2, 3,
1234 and a one-thread run): +7.0 to +9.4 points of preference accuracy and +6.2 to +19.6 of exact match
on every run (here at least +4 of each; before the weighting the shipped seed gained +3.6 points of
preference accuracy on the AMD EPYC and +4.8 on the Intel Xeon). grpo handed on the dpo model on every
run of both machines (+0.0; before its `min_improvement` margin it moved exact match by -1.4 to +0.0),
and may lose at most ALIGNMENT_SLACK (5 points) on a CPU where a step clears the margin on validation
and not on test. grpo also must not end below its start on its own validation prompts: it evaluates the
dpo model first and keeps it unless a step beats it by more than `min_improvement`.
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
SFT_MIN_EM = 0.20  # sft exact match, absolute (worst measured runs 0.242 and 0.220; the 0.45 is met on 6 of 10 runs)
SFT_MIN_PA_GAIN = 0.05  # over pretrain (worst measured run +7.8 points)
DPO_MIN_GAIN = 0.04  # dpo over sft, both preference accuracy and exact match (worst measured runs +7.0 and +6.2)
ALIGNMENT_SLACK = 0.05  # grpo may not lose more than this against the dpo model it starts from


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
    assert round(pa["sft"] - pa["pretrain"], 6) >= SFT_MIN_PA_GAIN, shown
    # gains compared rounded: scores are counts over 500, and 0.684 + 0.03 > 0.714 in floating point
    assert round(pa["dpo"] - pa["sft"], 6) >= DPO_MIN_GAIN and round(em["dpo"] - em["sft"], 6) >= DPO_MIN_GAIN, shown
    assert round(em["grpo"] - em["dpo"], 6) >= -ALIGNMENT_SLACK, shown
    grpo = [json.loads(line) for line in (tmp_path / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    held_out = {r["step"]: r["eval/exact_match"] for r in grpo if "eval/exact_match" in r and "step" in r}
    final = json.loads((tmp_path / "runs" / "grpo" / "stage.json").read_text())["metrics"]
    # the start model was a candidate, and the exported model is the one the spec's min_improvement picks:
    # replayed here, a step replaces the best so far only when it beats it by more than the margin
    margin = raw["stages"]["grpo"]["train"].get("min_improvement", 0.0)
    best = held_out[0]
    for step in sorted(held_out)[1:]:
        if held_out[step] > best + margin:
            best = held_out[step]
    assert 0 in held_out and final["eval/exact_match"] == best >= held_out[0], (held_out, final, margin)
