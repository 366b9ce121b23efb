"""`llmlab chat` through a pseudo-terminal and `llmlab generate` to JSONL, on a tiny saved model."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from llmlab.models import ModelNotFound, resolve_model_dir
from llmlab.model import LlmlabConfig, build_model
from llmlab.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat") / "stage"
    d = root / "model"
    tok = train_tokenizer([f"hello world {i} the answer is {i * 7}" for i in range(200)], 300, d)
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok), max_seq_len=64,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    build_model(cfg, seed=0).save_pretrained(d)
    return d


def read_until(fd, marker: bytes, timeout: float = 120) -> bytes:
    buf = b""
    deadline = time.time() + timeout
    while marker not in buf:
        if time.time() > deadline:
            raise TimeoutError(f"waited for {marker!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_streams_resets_and_exits_on_ctrl_c(model_dir):
    pid, fd = pty.fork()
    if pid == 0:  # the child: the real CLI on a terminal
        # a runner started in the background ignores SIGINT, and a thread of the test process (the
        # Prefect test server) may block it: give the CLI the terminal's normal Ctrl+C
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.execv(sys.executable, [sys.executable, "-m", "llmlab.cli", "chat", str(model_dir.parent),
                                  "--max-new-tokens", "6", "--temperature", "0"])
    try:
        banner = read_until(fd, b"> ")
        assert b"chat;" in banner and b"/reset" in banner  # our tokenizer has a chat template
        os.write(fd, b"hello\r")
        answer = read_until(fd, b"> ")
        assert b"hello" in answer and len(answer.split(b"hello", 1)[1].strip()) > 0  # a reply was streamed
        os.write(fd, b"/reset\r")
        assert b"conversation cleared" in read_until(fd, b"> ")
        os.write(fd, b"\x03")  # Ctrl+C at the prompt
        try:
            assert b"bye" in read_until(fd, b"bye", timeout=60)
        except TimeoutError as exc:  # say why: the child's signal masks, for whoever reads the CI log
            status = open(f"/proc/{pid}/status").read()
            masks = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
            raise AssertionError(f"no reaction to Ctrl+C; child {masks}") from exc
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_generate_writes_one_jsonl_row_per_prompt(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "the answer is"}\n')
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "llmlab.cli", "generate", str(model_dir), "--prompts", str(prompts),
                           "--out", str(out), "--max-new-tokens", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "the answer is"] and all(isinstance(r["completion"], str) for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    failed = subprocess.run([sys.executable, "-m", "llmlab.cli", "generate", str(model_dir), "--prompts", str(bad)],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "no 'prompt' field" in failed.stderr and "Traceback" not in failed.stderr


def test_resolve_model_dir(model_dir, tmp_path):
    assert resolve_model_dir(str(model_dir)) == model_dir
    assert resolve_model_dir(str(model_dir.parent)) == model_dir  # a stage output folder
    with pytest.raises(ModelNotFound, match="no model at"):
        resolve_model_dir(str(tmp_path))
