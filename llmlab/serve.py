"""`make serve` / `make stop`: a Prefect server, a process worker and the MLflow UI on 127.0.0.1.

    llmlab serve     # start all three, create the work pool, register every deployment in prefect.yaml
    llmlab stop      # stop exactly what `serve` started (each in its own process group)

State lives under the state directory: Prefect's database in `prefect/`, logs in `logs/`, and
`serve.json` with the ports and process-group ids. While it runs, `llmlab run` and `prefect` CLI
calls made through llmlab use this server (PREFECT_API_URL), so nothing starts a second database.
Ports: $LLMLAB_PREFECT_PORT (4200) and $LLMLAB_MLFLOW_PORT (5000). This module launches the
`prefect` and `mlflow` command-line tools as subprocesses; it imports neither.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llmlab.paths import QUIET_OFFLINE_DEFAULTS, quiet_defaults, state_dir

POOL = "llmlab"  # the process work pool every deployment in prefect.yaml uses
HOST = "127.0.0.1"
# Prefect's temporary server (a run with no server) must start within this; Prefect's own 20 s is
# too short on a busy 2-core machine creating its database for the first time (measured: timed out)
EPHEMERAL_STARTUP_SECONDS = "120"


def prefect_home() -> Path:
    """Prefect's state (its SQLite database) under llmlab's state dir; created (Prefect does not
    create missing parents)."""
    home = state_dir() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    return home


def configure_environment() -> None:
    """Defaults for a run started by llmlab: state under the state dir, no telemetry, quiet
    progress bars. Values already in the environment win. Call before importing prefect."""
    quiet_defaults()
    os.environ.setdefault("PREFECT_HOME", str(prefect_home()))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS)
    # while `llmlab serve` runs, talk to its server instead of starting a temporary one that would
    # write into the same database
    if "PREFECT_API_URL" not in os.environ:
        served = running()
        if served is not None:
            os.environ["PREFECT_API_URL"] = served["prefect_api_url"]


def prefect_api_problem(timeout: float = 3.0) -> str | None:
    """The one sentence for a PREFECT_API_URL that does not answer (None when it does, or when none is
    set: then a run uses llmlab's local server, `llmlab.prefect_server`). A run never falls back to
    another server by itself: its flow run would be missing from the server the user pointed at."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):
            return None
    except Exception:  # noqa: BLE001  not answering, however it fails
        return (f"the Prefect API at {url} (PREFECT_API_URL) does not answer: start it with `make serve`, or unset "
                f"PREFECT_API_URL to run on llmlab's local server")


def serve_file() -> Path:
    return state_dir() / "serve.json"


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def running() -> dict | None:
    """The serve.json record if its Prefect server is still alive, else None."""
    f = serve_file()
    if not f.is_file():
        return None
    info = json.loads(f.read_text())
    return info if _alive(info["processes"]["prefect-server"]) else None


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _env(api_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, **QUIET_OFFLINE_DEFAULTS, "LLMLAB_STATE_DIR": str(state_dir()),
           "PREFECT_HOME": str(prefect_home()), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "LLMLAB_PROJECT_DIR": str(Path.cwd())}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _start(name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start `cmd` in its own session (so stop can signal its whole group); returns the pgid."""
    logs = state_dir() / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def _wait_http(url: str, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer at {url} within {timeout:.0f}s; see {state_dir() / 'logs'}")


def _prefect(args: list[str], env: dict[str, str]) -> None:
    out = subprocess.run([_bin("prefect"), *args], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def _server_env(api: str) -> dict[str, str]:
    """The Prefect server's environment: its UI calls the API on the port it serves (not the default 4200)."""
    return {**_env(api), "PREFECT_SERVER_UI_API_URL": api, "PREFECT_UI_API_URL": api}


def serve(prefect_port: int | None = None, mlflow_port: int | None = None, timeout: float = 120) -> dict:
    """Start server, worker and MLflow UI; create the pool; deploy everything in prefect.yaml."""
    if running():
        raise RuntimeError(f"already serving (see {serve_file()}); run `make stop` first")
    from llmlab.prefect_server import stop as stop_local

    stop_local()  # the server `llmlab run` keeps shares the database: one server at a time
    prefect_port = prefect_port or int(os.environ.get("LLMLAB_PREFECT_PORT", "4200"))
    mlflow_port = mlflow_port or int(os.environ.get("LLMLAB_MLFLOW_PORT", "5000"))
    prefect_home()
    api = f"http://{HOST}:{prefect_port}/api"
    info = {"prefect_api_url": api, "prefect_ui": f"http://{HOST}:{prefect_port}",
            "mlflow_ui": f"http://{HOST}:{mlflow_port}", "processes": {}}
    procs = info["processes"]
    try:
        procs["prefect-server"] = _start("prefect-server", [_bin("prefect"), "server", "start", "--host", HOST, "--port",
                                                            str(prefect_port), "--analytics-off"], _server_env(api))
        serve_file().write_text(json.dumps(info, indent=2))
        procs["mlflow-ui"] = _start("mlflow-ui", [_bin("mlflow"), "server", "--backend-store-uri",
                                                  f"sqlite:///{state_dir() / 'mlflow.db'}", "--host", HOST,
                                                  "--port", str(mlflow_port), "--workers", "1"], _env())
        serve_file().write_text(json.dumps(info, indent=2))
        _wait_http(f"{api}/health", "the Prefect server", timeout)
        env = _env(api)
        _prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
        _prefect(["--no-prompt", "deploy", "--all"], env)
        procs["prefect-worker"] = _start("prefect-worker", [_bin("prefect"), "worker", "start", "--pool", POOL,
                                                            "--type", "process", "--install-policy", "never"], env)
        serve_file().write_text(json.dumps(info, indent=2))
        _wait_http(f"http://{HOST}:{mlflow_port}/health", "the MLflow UI", timeout)
    except BaseException:
        stop()
        raise
    return info


def stop(timeout: float = 20) -> list[str]:
    """Stop every process group recorded in serve.json (SIGTERM, then SIGKILL); returns their names."""
    f = serve_file()
    if not f.is_file():
        return []
    info = json.loads(f.read_text())
    stopped = []
    for name, pgid in reversed(list(info["processes"].items())):  # worker first, server last
        if not _alive(pgid):
            continue
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _alive(pgid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        stopped.append(name)
    f.unlink()
    return stopped
