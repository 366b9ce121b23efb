"""`llmlab env`: the versions, devices, choices and endpoints in effect here, with secrets masked and
nothing created; `--probe` runs the fast paths and reports each one's failure with its cause."""

import http.server
import json
import os
import platform
import socket
import threading
from importlib import metadata

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llmlab import environment
from llmlab.cli import app


@pytest.fixture
def health_server():
    """An HTTP server on 127.0.0.1 that answers every GET with 200, as Prefect's /api/health does."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/api"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env_vars(tmp_path, monkeypatch, health_server):
    state = tmp_path / "state"
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(state))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:hunter2@127.0.0.1:{closed_port()}")
    monkeypatch.setenv("PREFECT_API_URL", health_server)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("LLMLAB_DECODE", "dynamic")
    return state


def test_env_reports_versions_devices_choices_and_endpoints_for_a_bug_report(env_vars, health_server):
    out = CliRunner().invoke(app, ["env"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert text.startswith("## llmlab environment")
    assert f"- Python: {platform.python_version()}" in text
    assert f"- torch: {torch.__version__} (CUDA build {torch.version.cuda or 'none'}" in text
    for name in ("transformers", "peft", "prefect", "mlflow", "lm_eval", "datasets"):
        assert f"- {name}: {metadata.version(name)}\n" in text
    assert f"{os.cpu_count()} cores (torch uses {torch.get_num_threads()} threads)" in text
    if not torch.cuda.is_available():
        assert "device cpu, precision fp32, compile off, decode dynamic" in text
    assert f"- state directory: {env_vars} (from $LLMLAB_STATE_DIR)" in text and not env_vars.exists()
    assert "MLflow tracking URI: http://alice:***@127.0.0.1:" in text and "$MLFLOW_TRACKING_URI, DOES NOT ANSWER" in text
    assert f"- Prefect API: {health_server} (from $PREFECT_API_URL, answers)" in text
    assert "- HF_TOKEN=***" in text and "- LLMLAB_DECODE=dynamic" in text
    assert "hf_secret_value" not in text and "hunter2" not in text
    assert "not run: `llmlab env --probe`" in text


def test_env_json_and_a_specs_tracking_uri(env_vars, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.delenv("PREFECT_HOME", raising=False)  # then the database under the state directory
    spec = {"name": "p", "tokenizer": {"path": "tok"}, "tracking": {"uri": f"sqlite:///{tmp_path / 'elsewhere.db'}"},
            "stages": {"pretrain": {"kind": "pretrain", "data": [{"path": "corpus.txt"}]}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(app, ["env", str(tmp_path / "p.yaml"), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["endpoints"]["mlflow"] == {"value": spec["tracking"]["uri"], "from": "the spec's tracking.uri"}
    assert info["endpoints"]["prefect"]["value"] is None and str(env_vars / "prefect") in info["endpoints"]["prefect"]["from"]
    assert info["packages"]["peft"] == metadata.version("peft") and info["devices"][-1]["device"] == "cpu"
    assert "probe" not in info


def test_a_bad_spec_given_to_env_is_the_usual_message(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: p\nstages: {}\n")
    out = CliRunner().invoke(app, ["env", str(tmp_path / "bad.yaml")])
    assert out.exit_code == 2 and "Traceback" not in out.output and "bad.yaml" in out.output


def test_the_probe_reports_each_fast_path_that_fails_with_its_cause(monkeypatch):
    import llmlab.train.speed as speed
    from llmlab.model.static_decode import StaticDecoder

    monkeypatch.setattr(speed, "compile_blocks", lambda model: (_ for _ in ()).throw(RuntimeError("no C++ compiler")))
    monkeypatch.setattr(StaticDecoder, "prefill", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("no buffers")))
    info = environment.collect(probe=True)
    assert info["probe"]["compile"] == {"works": False, "error": "RuntimeError: no C++ compiler"}
    assert info["probe"]["decode"]["works"] is False and info["probe"]["decode"]["error"] == "RuntimeError: no buffers"
    text = environment.render(info)
    assert "- compile: FAILS (RuntimeError: no C++ compiler)" in text and "FAILS (RuntimeError: no buffers)" in text


@pytest.mark.slow
def test_the_probe_compiles_and_decodes_statically_here_with_the_eager_numbers():
    import subprocess
    import sys

    # in a process of its own, as `llmlab env --probe` runs: compiling leaves torch's tracing state
    # behind, which other tests in this process would trip over
    env = {**os.environ, "LLMLAB_DECODE": "dynamic"}  # the probe tries the static decoder regardless
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "env", "--probe", "--json"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    compiled, decoded = info["probe"]["compile"], info["probe"]["decode"]
    assert compiled["works"] and abs(compiled["loss_compiled"] - compiled["loss_eager"]) < 1e-3, compiled
    assert decoded["works"] and decoded["same_tokens"] and decoded["graph_captured"] == torch.cuda.is_available()
    assert "- compile: works, first step" in environment.render(info)
