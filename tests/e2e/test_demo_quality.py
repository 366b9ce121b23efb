"""The shipped demo, as `make demo` runs it: instruction tuning must teach the tasks, preference
optimisation must raise both preference accuracy and exact match, and grpo must not undo it.

Margins come from `bench/quality.py` over seeds 1, 2, 3 and a one-thread run (docs/benchmarks.md,
fourth session's recipe with the plus family), taken below each worst run so they hold on other CPUs:
sft's worst run reached exact match 0.242 (floor here 0.20) and +7.8 points of preference accuracy
(here +5); dpo gained +5.2 to +6.2 points of preference accuracy and +6.0 to +9.6 of exact match on
every run (here at least +3 of each); grpo handed on the dpo model on every run (+0.0; before its
`min_improvement` margin it moved exact match by -1.4 to +0.0), and may lose at most ALIGNMENT_SLACK
(5 points) on a CPU where a step clears the margin on validation and not on test. grpo also must not
end below its start on its own validation prompts: it evaluates the dpo model first and keeps it
unless a step beats it by more than `min_improvement`.
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
SFT_MIN_EM = 0.20  # sft exact match, absolute (worst measured run 0.242; the 0.45 is met on 3 of 4 runs)
SFT_MIN_PA_GAIN = 0.05  # over pretrain (worst measured run +7.8 points)
DPO_MIN_GAIN = 0.03  # dpo over sft, both preference accuracy and exact match (worst measured runs +5.2 and +6.0)
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
    assert pa["sft"] >= pa["pretrain"] + SFT_MIN_PA_GAIN, shown
    assert pa["dpo"] >= pa["sft"] + DPO_MIN_GAIN and em["dpo"] >= em["sft"] + DPO_MIN_GAIN, shown
    assert em["grpo"] >= em["dpo"] - ALIGNMENT_SLACK, shown
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
