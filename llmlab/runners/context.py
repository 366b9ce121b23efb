"""What a stage is, before it runs: its result record and the context a runner gets.

    ctx = StageContext(spec, "sft", spec.stages["sft"], out_dir, inputs={"pretrain": result}, run=run,
                       resolved=resolved_config(spec, "sft"))

Runners (`llmlab.runners.<kind>`) receive a `StageContext` and return (outputs, metrics); executing a
stage (cache, lock, MLflow run, stage.json) is `llmlab.execute`'s job, and what each kind is —
its runner, main output, resolved config — is its record (`llmlab.runners.registry`). Nothing here
imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab.spec import Pipeline


@dataclass
class StageResult:
    """What a stage hands to the next: small, JSON-able (Prefect persists and hashes it)."""

    stage: str
    kind: str
    output_dir: str
    fingerprint: str  # of the stage's main output (model / tokenizer / results)
    config_hash: str
    mlflow_run_id: str | None
    status: str
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path, e.g. model, tokenizer
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False  # True when a finished output was reused instead of running

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageResult":
        return cls(**d)


@dataclass
class StageContext:
    """Everything a runner needs; built by `llmlab.execute.execute_stage` (or a torchrun worker)."""

    spec: Pipeline
    name: str
    config: Any  # the stage's spec block (TokenizerSpec for the tokenizer stage)
    out_dir: Path
    inputs: dict[str, StageResult]
    run: Any  # tracking.StageRun (or a stand-in that logs nothing, on ranks > 0)
    stage_dir: Path | None = None  # the stage's real folder (= out_dir except on ranks > 0 of a distributed stage)
    resolved: dict[str, Any] = field(default_factory=dict)  # the config it runs with (registry.resolved_config)
    kinds: dict[str, Any] = field(default_factory=dict)  # every kind's record, for a runner that reads other stages' (eval)

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live: the stage's own folder, on every rank."""
        return (self.stage_dir or self.out_dir) / "checkpoints"

    def log(self, metrics: dict[str, float], step: int) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    def tokenizer_dir(self) -> str:
        """Where this stage's tokenizer lives: the tokenizer stage's output, or the spec's name/path."""
        if "tokenizer" in self.inputs:
            return self.inputs["tokenizer"].outputs["tokenizer"]
        tok = self.spec.tokenizer
        return tok.path or tok.name  # type: ignore[return-value]


def stage_block(spec: Pipeline, stage: str) -> Any:
    return spec.tokenizer if stage == "tokenizer" else spec.stages[stage]
