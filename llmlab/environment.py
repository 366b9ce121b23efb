"""`llmlab env`: what this machine runs llmlab with, as text to paste into a bug report.

    info = collect(probe=True)        # versions, devices, what `auto` picks, endpoints, fast-path probe
    print(render(info))               # or json.dumps(info)

Versions come from the installed packages' metadata (nothing but torch is imported). Devices list
each CUDA card with its memory, compute capability and bf16 support, and the CPU. "What auto picks"
is the device, precision, `compile` and `decode` a stage gets with the defaults here. The endpoints
are the state directory, the MLflow tracking URI and the Prefect API a run would use, each with
where it came from; http endpoints are asked whether they answer (two seconds at most). `probe`
runs the two fast paths on a small llmlab model on the default device — one compiled training step
(`torch.compile` of the blocks, as `compile: true` does) against the eager one, and a greedy decode
on the static KV cache (graph-captured on CUDA) against the growing cache — and says whether each
works and gives the same numbers. Secrets in environment variables and URIs are masked.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import re
import sys
import time
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from llmlab import __version__
from llmlab.paths import state_dir

PACKAGES = ("torch", "transformers", "peft", "datasets", "tokenizers", "safetensors", "prefect", "mlflow", "lm_eval",
            "pydantic", "numpy")
ENV_PREFIXES = ("LLMLAB_", "HF_", "TRANSFORMERS_", "CUDA_", "NCCL_", "TORCH_", "PYTORCH_", "OMP_", "PREFECT_API_URL",
                "PREFECT_HOME", "MLFLOW_TRACKING_URI")
SECRET = re.compile(r"TOKEN|KEY|PASSWORD|SECRET|AUTH", re.IGNORECASE)
ANSWER_SECONDS = 2.0


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _mask_uri(uri: str) -> str:
    """A URI without the password in its user part."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=ANSWER_SECONDS) as response:
            return response.status < 500
    except Exception:  # noqa: BLE001  any failure to answer is the answer
        return False


def _devices() -> list[dict[str, Any]]:
    import torch

    found: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            with torch.cuda.device(i):
                bf16 = torch.cuda.is_bf16_supported()
            found.append({"device": f"cuda:{i}", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                          "compute_capability": f"{p.major}.{p.minor}", "bf16": bf16})
    cpu = platform.processor() or platform.machine()
    found.append({"device": "cpu", "name": _cpu_name() or cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "memory_gib": _memory_gib()})
    return found


def _cpu_name() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return None


def _auto_choices() -> dict[str, str]:
    """What a stage with the default settings runs with here."""
    import torch

    from llmlab.device import autocast_dtype, pick_device
    from llmlab.train.speed import should_compile

    device = pick_device()
    amp = autocast_dtype("auto", device)
    decode = os.environ.get("LLMLAB_DECODE") or ("static" if device.type == "cuda" else "dynamic")
    return {"device": device.type, "precision": "bf16" if amp == torch.bfloat16 else "fp32",
            "compile": "on" if should_compile("auto", device) else "off",
            "decode": f"{decode} (llmlab's own model; stock transformers models decode dynamically)"}


def _endpoints(spec_uri: str | None) -> dict[str, Any]:
    from llmlab.serve import running

    state = state_dir(create=False)  # a report creates nothing
    if spec_uri:
        mlflow_uri, mlflow_from = spec_uri, "the spec's tracking.uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow_uri, mlflow_from = os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    else:
        mlflow_uri, mlflow_from = f"sqlite:///{state / 'mlflow.db'}", "the default: SQLite under the state directory"
    served = running() if (state / "serve.json").is_file() else None
    local = _local_prefect(state)
    if os.environ.get("PREFECT_API_URL"):
        prefect, prefect_from = os.environ["PREFECT_API_URL"], "$PREFECT_API_URL"
    elif served is not None:
        prefect, prefect_from = served["prefect_api_url"], "`llmlab serve` (its serve.json)"
    elif local is not None:
        prefect, prefect_from = local, "llmlab's local server, running (`llmlab stop` stops it)"
    else:
        prefect = None
        prefect_from = ("neither $PREFECT_API_URL nor `llmlab serve`: the next run starts llmlab's local server on the "
                        f"database under {os.environ.get('PREFECT_HOME') or state / 'prefect'}")
    out: dict[str, Any] = {
        "state_dir": {"value": str(state), "from": "$LLMLAB_STATE_DIR" if os.environ.get("LLMLAB_STATE_DIR")
                      else "the default: .llmlab under the current directory"},
        "mlflow": {"value": _mask_uri(mlflow_uri), "from": mlflow_from},
        "prefect": {"value": _mask_uri(prefect) if prefect else None, "from": prefect_from},
    }
    if mlflow_uri.startswith(("http://", "https://")):
        out["mlflow"]["answers"] = _answers(mlflow_uri.rstrip("/") + "/health")
    if prefect:
        out["prefect"]["answers"] = _answers(prefect.rstrip("/") + "/health")
    return out


def _local_prefect(state: Path) -> str | None:
    """The URL of the local Prefect server `llmlab run` keeps, when it runs (read without creating anything)."""
    import json

    from llmlab.prefect_server import _alive

    try:
        info = json.loads((state / "prefect-server" / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return info["url"] if _alive(info["pid"]) else None


def _environment_variables() -> dict[str, str]:
    return {k: ("***" if SECRET.search(k) else _mask_uri(v)) for k, v in sorted(os.environ.items())
            if k.startswith(ENV_PREFIXES)}


@contextlib.contextmanager
def _without(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def _probe_model(device: Any) -> Any:
    from llmlab.model import LlmlabConfig, build_model

    cfg = LlmlabConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, vocab_size=128, max_seq_len=64)
    return build_model(cfg, seed=0).to(device)


def probe_compile(device: Any) -> dict[str, Any]:
    """One training step (forward and backward) with the blocks compiled, against the eager step."""
    import torch

    from llmlab.train.speed import compile_blocks

    try:
        eager = _probe_model(device)
        compiled = copy.deepcopy(eager)
        ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
        eager(input_ids=ids, labels=ids).loss.backward()
        started = time.perf_counter()
        compile_blocks(compiled)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        seconds = time.perf_counter() - started
        want = eager(input_ids=ids, labels=ids).loss.detach()
        loss = loss.detach()
        grads = max(float((a.grad - b.grad).abs().max()) for a, b in zip(eager.parameters(), compiled.parameters())
                    if a.grad is not None)
        same = torch.allclose(loss, want, rtol=1e-3, atol=1e-4) and grads <= 1e-3
        return {"works": bool(same), "seconds": round(seconds, 1), "loss_eager": round(float(want), 6),
                "loss_compiled": round(float(loss), 6), "max_grad_difference": grads}
    except Exception as exc:  # noqa: BLE001  the probe reports any failure
        return {"works": False, "error": _cause(exc)}


def probe_decode(device: Any) -> dict[str, Any]:
    """Greedy tokens on the static KV cache (compiled and graph-captured on CUDA) against the growing cache."""
    import torch

    from llmlab.generate import sample

    graphs = device.type == "cuda"
    try:
        model = _probe_model(device).eval()
        ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]], device=device)
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device=device)
        with _without("LLMLAB_DECODE"):
            dynamic = sample(model, ids, mask, 12, None, 0, 0.0, decode="dynamic").tokens
            started = time.perf_counter()
            static = sample(model, ids, mask, 12, None, 0, 0.0, decode="static").tokens
        seconds = time.perf_counter() - started
        same = torch.equal(static, dynamic)
        return {"works": bool(same), "graph_captured": graphs, "seconds": round(seconds, 1), "same_tokens": bool(same)}
    except Exception as exc:  # noqa: BLE001  the probe reports any failure
        return {"works": False, "graph_captured": graphs, "error": _cause(getattr(exc, "__cause__", None) or exc)}


def collect(probe: bool = False, spec_uri: str | None = None) -> dict[str, Any]:
    """Everything `llmlab env` shows, as a JSON-able dict."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info: dict[str, Any] = {
        "llmlab": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_build": {"cuda": torch.version.cuda, "cudnn": cudnn, "cuda_available": torch.cuda.is_available(),
                        "hip": getattr(torch.version, "hip", None)},
        "devices": _devices(),
        "auto": _auto_choices(),
        "endpoints": _endpoints(spec_uri),
        "environment": _environment_variables(),
    }
    if probe:
        from llmlab import fastpath
        from llmlab.device import pick_device

        device = pick_device()
        fastpath.reset()
        info["probe"] = {"device": str(device), "compile": probe_compile(device), "decode": probe_decode(device)}
        fastpath.reset()
    return info


def _probe_line(name: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"- {name}: FAILS ({result['error']})"
    if name == "compile":
        verdict = "works" if result["works"] else "RUNS BUT DIFFERS"
        return (f"- compile: {verdict}, first step {result['seconds']} s; loss {result['loss_compiled']} compiled vs "
                f"{result['loss_eager']} eager, largest gradient difference {result['max_grad_difference']:.1e}")
    how = "graph-captured static decode" if result["graph_captured"] else "static KV cache (no CUDA: no graph capture)"
    verdict = "works, same tokens as the growing cache" if result["works"] else "RUNS BUT GIVES OTHER TOKENS"
    return f"- {how}: {verdict} ({result['seconds']} s)"


def render(info: dict[str, Any]) -> str:
    """The text `llmlab env` prints: Markdown, ready for an issue."""
    lines = ["## llmlab environment", "", f"- llmlab: {info['llmlab']}", f"- Python: {info['python']}",
             f"- platform: {info['platform']}"]
    build = info["torch_build"]
    lines.append(f"- torch: {info['packages']['torch']} (CUDA build {build['cuda'] or 'none'}, cuDNN {build['cudnn'] or 'none'}"
                 + (f", HIP {build['hip']}" if build["hip"] else "") + f"; CUDA available: {build['cuda_available']})")
    lines += [f"- {name}: {v}" for name, v in info["packages"].items() if name != "torch"]
    lines += ["", "### Devices"]
    for d in info["devices"]:
        if d["device"] == "cpu":
            lines.append(f"- cpu: {d['name']}, {d['cores']} cores (torch uses {d['torch_threads']} threads), "
                         f"{d['memory_gib']} GiB memory")
        else:
            lines.append(f"- {d['device']}: {d['name']}, {d['memory_gib']} GiB, compute capability "
                         f"{d['compute_capability']}, bf16 {'yes' if d['bf16'] else 'no'}")
    a = info["auto"]
    lines += ["", "### What `auto` picks here",
              f"- device {a['device']}, precision {a['precision']}, compile {a['compile']}, decode {a['decode']}"]
    lines += ["", "### Fast-path probe"]
    if "probe" in info:
        lines.append(f"- on {info['probe']['device']}:")
        lines += ["  " + _probe_line(name, info["probe"][name]) for name in ("compile", "decode")]
    else:
        lines.append("- not run: `llmlab env --probe` tries torch.compile and the static decoder here")
    lines += ["", "### Where runs go"]
    names = {"state_dir": "state directory", "mlflow": "MLflow tracking URI", "prefect": "Prefect API"}
    for key, label in names.items():
        e = info["endpoints"][key]
        answer = "" if "answers" not in e else (", answers" if e["answers"] else ", DOES NOT ANSWER")
        lines.append(f"- {label}: {e['value'] or 'none running'} (from {e['from']}{answer})")
    lines += ["", "### Environment variables"]
    lines += [f"- {k}={v}" for k, v in info["environment"].items()] or ["- none that llmlab, torch or the Hugging Face "
                                                                      "libraries read"]
    return "\n".join(lines)
