"""The light commands stay light: `llmlab --help`, `validate`, `inspect` and `plan` on the demo spec
import neither torch, transformers, prefect nor mlflow (each costs about a second or more to
import), so they answer in well under two seconds. A fully reused `llmlab run` is held to the same
(tests/e2e/test_orchestration.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "prefect", "mlflow", "lm_eval", "datasets")


def imported(args: list[str], cwd: Path) -> set[str]:
    """The top-level packages a CLI command imported (python -X importtime, in a fresh process)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmlab.cli", *args], capture_output=True, text=True,
                         cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("command", [["--help"], ["validate", "SPEC"], ["inspect", "SPEC"], ["plan", "SPEC"]])
def test_light_commands_import_no_heavy_library(command, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    # plan measures this machine's matmul rate once (with torch) and keeps it: the cached rate is what
    # every later plan reads
    (tmp_path / "state" / "machine_rate.json").write_text("{}")
    import json

    from llmlab.plan import machine_rate

    machine_rate()  # fills the cache in this process (torch is loaded here already)
    assert json.loads((tmp_path / "state" / "machine_rate.json").read_text())
    args = [str(ROOT / "pipelines" / "tiny.yaml") if a == "SPEC" else a for a in command]
    heavy = imported(args, tmp_path) & set(HEAVY)
    assert not heavy, f"llmlab {' '.join(command)} imported {sorted(heavy)}"
