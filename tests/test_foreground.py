"""The hand-over between a stage run in the `llmlab` process and the flow that records it
(llmlab.foreground), and which `--only` runs can run there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmlab.checkpoint import atomic_write_json
from llmlab.errors import StageFailed
from llmlab.foreground import await_stage, eligible
from llmlab.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def handoff(folder: Path, pid: int) -> Path:
    atomic_write_json(folder / "handoff.json", {"pid": pid, "parent_run_id": "local-" + "0" * 32})
    return folder


def test_a_handed_over_result_or_sentence_reaches_the_follower(tmp_path):
    folder = handoff(tmp_path, os.getpid())
    atomic_write_json(folder / "sft.json", {"result": {"stage": "sft", "status": "finished"}})
    assert await_stage(folder, "sft") == {"stage": "sft", "status": "finished"}
    atomic_write_json(folder / "dpo.json", {"error": "stage 'dpo': pairs.jsonl has no rows; add rows"})
    with pytest.raises(StageFailed, match="pairs.jsonl has no rows"):
        await_stage(folder, "dpo")


def test_a_follower_whose_foreground_process_is_gone_fails_the_stage_in_one_sentence(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ticks = []
    with pytest.raises(StageFailed, match=rf"stage 'sft': the process running it \(pid {gone.pid}\) ended before it "
                                          r"finished; run again to resume"):
        await_stage(handoff(tmp_path, gone.pid), "sft", tick=lambda: ticks.append(1))


def test_only_runs_here_unless_a_stage_selects_a_branch_or_runs_under_torchrun():
    tiny = load_spec(ROOT / "pipelines" / "tiny.yaml")
    assert eligible(tiny, ["sft"], {}) and eligible(tiny, ["sft", "dpo"], {})
    sweep = load_spec(ROOT / "pipelines" / "tiny-sweep.yaml")
    selecting = [n for n in sweep.stage_names() if n != "tokenizer" and sweep.selection(n) is not None]
    assert selecting and not eligible(sweep, [selecting[0]], {})
    assert eligible(sweep, ["sft"], {})
    raw = yaml.safe_load((ROOT / "pipelines" / "tiny.yaml").read_text())
    raw["stages"]["sft"]["distributed"] = {"nproc_per_node": 2}
    assert not eligible(parse_spec(yaml.safe_dump(raw, sort_keys=False)), ["sft"], {})  # under torchrun: through the flow
