"""The fault table: what a user sees, and what is kept, when something fails around a run.

    sudo .venv/bin/python bench/faults.py [--workdir bench-runs/faults] [--only NAME ...] [--json out.json]

Each row runs one small pipeline (tokenizer -> pretrain -> sft, builtin data, tiny model) through
`llmlab run` as a user would, with one fault:

- mlflow-down-at-start: `tracking.uri` names a server that does not answer; afterwards a real
  `mlflow server` is started there and `llmlab sync` run.
- mlflow-down-mid-stage: the server is stopped while pretrain trains and started again 10 s later.
- prefect-down: PREFECT_API_URL names an API that does not answer.
- disk-full: the workdir is a 2 MiB filesystem (the first checkpoint does not fit); then it is
  grown and the same command run again.
- read-only-workdir: the workdir is a read-only filesystem.
- kill-9: SIGKILL to the whole `llmlab run` process group after pretrain's first checkpoint; then
  the same command again.
- ctrl-c: SIGINT to the process group after pretrain's first checkpoint (what Ctrl+C sends); then the
  same command again.
- second-run: the same command started again while the first run trains pretrain.

For each: the exit code, the lines printed, whether a traceback appeared, the line that says what
happened, and what was kept (each stage's status; for a rerun, whether the interrupted stage resumed
and how the rerun ended). The two filesystem rows mount small tmpfs filesystems and need root; without
it they are reported as not run. Markdown for docs/faults.md on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
         "LLMLAB_PREFECT_IDLE_SECONDS": "0"}  # each run stops the local Prefect server it started
BIN = Path(sys.executable).parent
SAYS = ("warning", "error", "failed", "interrupted", "problem", "does not answer", "waiting", "waits", "resum", "sent",
        "reused", "no space", "not writable", "read-only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline(runs: Path, name: str, tracking: dict | None = None) -> dict:
    def train(steps: int, **extra) -> dict:
        return {"max_steps": steps, "warmup_steps": 5, "eval_every": 50, "eval_steps": 2, "save_every": 20,
                "log_every": 5, **extra}

    raw = {"name": name, "seed": 3, "workdir": str(runs),
           "tokenizer": {"train": {"vocab_size": 512, "max_documents": 1500, "data": [{"path": "builtin:stdlib"}]}},
           "model": {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "n_layers": 2, "max_seq_len": 64},
           "stages": {"pretrain": {"kind": "pretrain", "data": [{"path": "builtin:stdlib"}],
                                   "train": train(300, batch_sequences=8, gradient_accumulation_steps=1)},
                      "sft": {"kind": "sft", "from": "pretrain", "data": [{"path": "builtin:tasks"}], "max_examples": 500,
                              "train": train(40, batch_sequences=8, gradient_accumulation_steps=1)}}}
    if tracking:
        raw["tracking"] = tracking
    return raw


class Case:
    """One scenario's folder, spec, environment and console."""

    def __init__(self, root: Path, name: str, runs: Path | None = None, tracking: dict | None = None, **env: str):
        self.dir = root / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.runs = runs or self.dir / "runs"
        self.spec = self.dir / "pipeline.yaml"
        self.spec.write_text(yaml.safe_dump(pipeline(self.runs, f"faults-{name}", tracking), sort_keys=False))
        self.env = {**os.environ, **QUIET, "LLMLAB_STATE_DIR": str(self.dir / "state"), **env}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        if "PREFECT_API_URL" not in env:
            self.env.pop("PREFECT_API_URL", None)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "llmlab.cli", *args], cwd=self.dir, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, *args: str, timeout: float = 900) -> tuple[int, str]:
        proc = self.start(*(args or ("run", str(self.spec))))
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out

    def statuses(self) -> str:
        found = []
        for stage in ("tokenizer", "pretrain", "sft"):
            try:
                status = json.loads((self.runs / stage / "stage.json").read_text())["status"]
            except (OSError, ValueError, KeyError):
                status = "none"
            ckpts = self.runs / stage / "checkpoints"
            kept = len([p for p in ckpts.iterdir() if p.name.startswith("step")]) if ckpts.is_dir() else 0
            found.append(f"{stage} {status}" + (f" ({kept} checkpoints)" if status != "finished" and kept else ""))
        return ", ".join(found)

    def wait_for_checkpoint(self, proc: subprocess.Popen, stage: str = "pretrain", timeout: float = 600) -> None:
        ckpts = self.runs / stage / "checkpoints"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ckpts.is_dir() and any(p.name.startswith("step") for p in ckpts.iterdir()):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended before {stage} wrote a checkpoint: {proc.stdout.read()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{stage} wrote no checkpoint in {timeout} s")


PREFECT_LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| \w+ +\| (?:Task run|Flow run) '[^']+' - ")


def said(out: str) -> str:
    """The line that says what happened: the first naming a fault or its outcome (without Prefect's
    log prefix; a heading that ends in a colon gives way to the line under it)."""
    lines = [PREFECT_LOG.sub("", line.strip()) for line in out.splitlines() if line.strip()]
    for line in lines:
        low = line.lower()
        if any(word in low for word in SAYS) and not line.endswith(":") and not low.startswith("prefect:"):
            return line[:300]
    return lines[-1][:300] if lines else ""


def row(fault: str, code: int | None, out: str, kept: str, then: str = "") -> dict:
    log = ROOT / "bench-runs" / "faults-console"
    log.mkdir(parents=True, exist_ok=True)
    (log / f"{fault.split()[0].lower()}-{abs(hash(fault)) % 10**6}.log").write_text(out)
    return {"fault": fault, "exit": code, "lines": len([line for line in out.splitlines() if line.strip()]),
            "traceback": "Traceback" in out, "says": said(out), "kept": kept, "then": then}


def start_mlflow(folder: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=folder,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def mlflow_runs(uri: str, experiment: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return "MLflow: nothing"
    runs = client.search_runs([exp.experiment_id])
    metrics = sum(len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs)
    return f"MLflow: {len(runs)} runs ({', '.join(sorted(r.info.status for r in runs))}), {metrics} train/loss points"


# ----------------------------------------------------------------------------------------- scenarios


def mlflow_down_at_start(root: Path) -> dict:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    case = Case(root, "mlflow-down-at-start", tracking={"uri": uri})
    code, out = case.run()
    server = start_mlflow(case.dir, port)
    try:
        sync_code, sync_out = case.run("sync")
        return row("MLflow server down at the start", code, out, case.statuses(),
                   f"`llmlab sync` once it answers: exit {sync_code}, \"{said(sync_out)}\"; "
                   f"{mlflow_runs(uri, 'faults-mlflow-down-at-start')}")
    finally:
        stop(server)


def mlflow_down_mid_stage(root: Path) -> dict:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    case = Case(root, "mlflow-down-mid-stage", tracking={"uri": uri, "wait_seconds": 120})
    server = start_mlflow(case.dir, port)
    proc = case.start("run", str(case.spec))
    try:
        case.wait_for_checkpoint(proc)
        stop(server)
        time.sleep(10)
        server = start_mlflow(case.dir, port)
        out, _ = proc.communicate(timeout=900)
        return row("MLflow server stopped mid-stage, started again", proc.returncode, out, case.statuses(),
                   mlflow_runs(uri, "faults-mlflow-down-mid-stage"))
    finally:
        stop(server)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def prefect_down(root: Path) -> dict:
    case = Case(root, "prefect-down", PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    code, out = case.run()
    return row("Prefect API down (PREFECT_API_URL set)", code, out, case.statuses())


def _mount(folder: Path, size: str, readonly: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    if readonly:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def disk_full(root: Path) -> dict:
    mount = root / "disk-full-mount"
    _mount(mount, "2m")
    try:
        case = Case(root, "disk-full", runs=mount / "runs")
        code, out = case.run()
        kept = case.statuses()
        subprocess.run(["mount", "-o", "remount,size=200m", str(mount)], check=True)
        again, out2 = case.run()
        return row("Disk full (the workdir's filesystem)", code, out, kept,
                   f"after freeing space, the same command: exit {again}, {case.statuses()}")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def read_only_workdir(root: Path) -> dict:
    mount = root / "read-only-mount"
    _mount(mount, "10m", readonly=True)
    try:
        case = Case(root, "read-only-workdir", runs=mount / "runs")
        code, out = case.run()
        return row("Read-only workdir", code, out, case.statuses())
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _interrupt(root: Path, name: str, fault: str, sig: int) -> dict:
    case = Case(root, name)
    proc = case.start("run", str(case.spec))
    case.wait_for_checkpoint(proc)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    kept = case.statuses()
    again, out2 = case.run()
    resumed = next((line.strip() for line in out2.splitlines() if "resum" in line.lower()), "no resume line")
    return row(fault, proc.returncode, out or "", kept, f"the same command again: exit {again}, \"{resumed[:160]}\", "
                                                        f"{case.statuses()}")


def kill_9(root: Path) -> dict:
    return _interrupt(root, "kill-9", "kill -9 mid-stage", signal.SIGKILL)


def ctrl_c(root: Path) -> dict:
    return _interrupt(root, "ctrl-c", "Ctrl+C mid-stage", signal.SIGINT)


def second_run(root: Path) -> dict:
    case = Case(root, "second-run")
    first = case.start("run", str(case.spec))
    try:
        case.wait_for_checkpoint(first)
        code, out = case.run()
        first_out, _ = first.communicate(timeout=900)
        return row("The same spec run again while it runs", code, out, case.statuses(),
                   f"the first run: exit {first.returncode}")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


SCENARIOS = {"mlflow-down-at-start": mlflow_down_at_start, "mlflow-down-mid-stage": mlflow_down_mid_stage,
             "prefect-down": prefect_down, "disk-full": disk_full, "read-only-workdir": read_only_workdir,
             "kill-9": kill_9, "ctrl-c": ctrl_c, "second-run": second_run}
NEEDS_ROOT = {"disk-full", "read-only-workdir"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "faults")
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or SCENARIOS:
        if name in NEEDS_ROOT and os.geteuid() != 0:
            rows.append({"fault": name, "exit": None, "lines": 0, "traceback": False, "says": "not run: needs root",
                         "kept": "", "then": ""})
            continue
        started = time.time()
        print(f"[faults] {name} ...", file=sys.stderr, flush=True)
        rows.append({**SCENARIOS[name](args.workdir.resolve()), "seconds": round(time.time() - started)})
    print("| fault | exit | lines | traceback | what the user reads | kept | then |")
    print("|---|---:|---:|---|---|---|---|")
    for r in rows:
        says = r["says"].replace("|", "\\|")
        print(f"| {r['fault']} | {r['exit']} | {r['lines']} | {'yes' if r['traceback'] else 'no'} | {says} | {r['kept']} "
              f"| {r['then']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any(r["traceback"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
