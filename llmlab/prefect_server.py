"""The local Prefect server `llmlab run` records its flow runs on when no other is set.

    with lease() as (url, started):   # the running server, or a new one (seconds, once); kept
        ...                            # up at least until this run ends

Without PREFECT_API_URL and without `llmlab serve`, a run needs a Prefect server for its flow run.
llmlab keeps one per state directory, started by the first run that needs it, in a session of its
own — so Ctrl+C in the terminal reaches the run (which saves a checkpoint and stops) but not the
server the run is still reporting to — and kept for the runs after it: it stops by itself
LLMLAB_PREFECT_IDLE_SECONDS (900) after the last run using it ended, at once with 0, or with
`llmlab stop` / `make stop`. Its database is Prefect's own under the state directory (the one a
temporary server would use), so the Prefect UI of `llmlab serve` shows the same runs.

The server runs under a watchdog (`python -m llmlab.prefect_server`): it starts `prefect server
start` on 127.0.0.1, and ends it once no run holds a lease (a file named by the run's process id
under `<state dir>/prefect-server/leases/`) and the idle time has passed. Nothing here imports prefect.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from llmlab.paths import state_dir

IDLE_ENV = "LLMLAB_PREFECT_IDLE_SECONDS"
IDLE_SECONDS = 900.0
STARTUP_SECONDS = 120.0  # a busy 2-core machine creating the database for the first time needs tens of seconds
POLL_SECONDS = 1.0
HOST = "127.0.0.1"


def folder() -> Path:
    path = state_dir() / "prefect-server"
    path.mkdir(parents=True, exist_ok=True)
    return path


def idle_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(IDLE_ENV, IDLE_SECONDS)))
    except ValueError:
        return IDLE_SECONDS


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # our own child that ended: reap it, or it stays a zombie
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001  not answering, however it fails
        return False


def running() -> dict | None:
    """The record of this state directory's server if its watchdog is alive, else None."""
    record = folder() / "server.json"
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return info if _alive(info["pid"]) else None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    import fcntl

    with open(folder() / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ensure() -> tuple[str, bool]:
    """(the server's API URL, whether it was started now); the caller holds the lock."""
    info = running()
    if info is not None and _answers(info["url"]):
        return info["url"], False
    if info is not None:  # alive but not answering: still starting, or stuck
        deadline = time.time() + STARTUP_SECONDS
        while time.time() < deadline and running() and not _answers(info["url"]):
            time.sleep(0.5)
        if running() and _answers(info["url"]):
            return info["url"], False
        stop()
    port = _free_port()
    url = f"http://{HOST}:{port}/api"
    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "prefect-local-server.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmlab.prefect_server", str(port)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "LLMLAB_STATE_DIR": str(state_dir())})
    (folder() / "server.json").write_text(json.dumps({"pid": proc.pid, "url": url, "started": time.time()}))
    deadline = time.time() + STARTUP_SECONDS
    while not _answers(url):
        if proc.poll() is not None or time.time() > deadline:
            stop()
            raise RuntimeError(f"the local Prefect server did not start within {STARTUP_SECONDS:.0f} s; see "
                               f"{logs / 'prefect-local-server.log'}")
        time.sleep(0.25)
    return url, True


@contextlib.contextmanager
def lease() -> Iterator[tuple[str, bool]]:
    """This state directory's server for the time inside: (its API URL, whether it was started now).
    It stays up at least until this process leaves and, with an idle time of 0, stops when the last
    process using it leaves."""
    leases = folder() / "leases"
    leases.mkdir(exist_ok=True)
    mine = leases / str(os.getpid())
    with _locked():  # the watchdog decides to stop under the same lock: a new lease is never missed
        found = _ensure()
        mine.touch()
    try:
        yield found
    finally:
        with _locked():
            mine.unlink(missing_ok=True)
            (folder() / "last-used").touch()
            last = not _live_leases()
        if last and idle_seconds() == 0:
            stop()


def _live_leases() -> list[Path]:
    leases = folder() / "leases"
    live = []
    for f in leases.iterdir() if leases.is_dir() else []:
        if f.name.isdigit() and _alive(int(f.name)):
            live.append(f)
        else:
            f.unlink(missing_ok=True)  # its run ended without saying so (killed)
    return live


def stop(timeout: float = 20.0) -> bool:
    """Stop this state directory's server (its watchdog's whole session); whether one was running."""
    info = running()
    record = folder() / "server.json"
    if info is None:
        record.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info["pid"], signal.SIGTERM)
    deadline = time.time() + timeout
    while _alive(info["pid"]) and time.time() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info["pid"], signal.SIGKILL)
    record.unlink(missing_ok=True)
    return True


def _watch(port: int) -> int:
    """The watchdog: run the server until it is idle (see the module docstring), then stop it."""
    from llmlab.paths import QUIET_OFFLINE_DEFAULTS

    env = {**os.environ, **QUIET_OFFLINE_DEFAULTS}
    env.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen([prefect, "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"],
                              env=env, stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: (server.terminate(), sys.exit(0)))
    (folder() / "last-used").touch()
    while server.poll() is None:
        time.sleep(POLL_SECONDS)
        with _locked():
            if _live_leases():
                continue
            last = (folder() / "last-used").stat().st_mtime if (folder() / "last-used").exists() else 0.0
            if time.time() - last < idle_seconds():
                continue
            with contextlib.suppress(OSError, ValueError):  # no new lease can find this server from here on
                if json.loads((folder() / "server.json").read_text())["pid"] == os.getpid():
                    (folder() / "server.json").unlink()
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1])))
