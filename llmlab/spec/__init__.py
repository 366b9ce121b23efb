"""The pipeline spec: pydantic models of the YAML file, strict loading, every error at once.

    from llmlab.spec import load_spec
    spec = load_spec("pipelines/tiny.yaml")      # raises SpecError listing every problem

The package's modules, each with one job:
- `base`: the strict model every block derives from, `config_hash`;
- `blocks`: tokenizer, model, optimizers, training, LoRA and distributed blocks;
- `stages`: one block per stage kind, built from shared pieces, and the `Stage` union;
- `pipeline`: the whole pipeline (`Pipeline`), tracking, rounds, promotion;
- `graph`: sweeps fanned out into branches, rounds unrolled;
- `references`: what `from`, `reference_stage` and `reward_stage` may name;
- `errors`: `SpecError` and the translation of pydantic's errors into YAML paths and fixes;
- `load`: `load_spec` / `parse_spec`, `json_schema`;
- `docs`: docs/spec.md, generated from the fields' descriptions.

Every name below is importable from `llmlab.spec` itself; a submodule is imported only when one of
its names is first used, so `llmlab.data.sources` can build on `llmlab.spec.base` while the stage
blocks build on data sources. Never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "base": ["Loc", "StrictModel", "config_hash", "redefault"],
    "blocks": ["OPTIMIZER_CLASSES", "OPTIMIZER_NAMES", "Adafactor", "AdamW", "DistributedSpec", "Lion", "LoraSpec",
               "ModelSpec", "Muon", "OptimizerSpec", "SGD", "Sophia", "TokenizerSpec", "TokenizerTrain", "TrainBase",
               "TrainSpec"],
    "stages": ["DEFAULT_PROMPTS", "REF_KEYS", "STAGE_CLASSES", "STAGE_KINDS", "Benchmark", "DpoStage", "DpoTrain", "EvalModel",
               "EvalStage", "ExportStage", "GrpoStage", "MergeStage", "ModelStage", "PpoStage", "PreferencesStage",
               "PretrainStage", "RewardStage", "RewardTrain", "RlStageBase", "RlTrain", "SftStage", "SftTrain", "Stage",
               "StageBase"],
    "pipeline": ["Pipeline", "PromoteSpec", "RepeatSpec", "TrackingSpec"],
    "errors": ["SpecError", "SpecIssue"],
    "load": ["json_schema", "load_spec", "parse_spec"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'llmlab.spec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llmlab.spec.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # what editors and type checkers see
    from llmlab.spec.base import Loc, StrictModel, config_hash, redefault  # noqa: F401
    from llmlab.spec.blocks import (  # noqa: F401
        OPTIMIZER_CLASSES, OPTIMIZER_NAMES, SGD, Adafactor, AdamW, DistributedSpec, Lion, LoraSpec, ModelSpec, Muon,
        OptimizerSpec, Sophia, TokenizerSpec, TokenizerTrain, TrainBase, TrainSpec)
    from llmlab.spec.errors import SpecError, SpecIssue  # noqa: F401
    from llmlab.spec.load import json_schema, load_spec, parse_spec  # noqa: F401
    from llmlab.spec.pipeline import Pipeline, PromoteSpec, RepeatSpec, TrackingSpec  # noqa: F401
    from llmlab.spec.stages import (  # noqa: F401
        DEFAULT_PROMPTS, REF_KEYS, STAGE_CLASSES, STAGE_KINDS, Benchmark, DpoStage, DpoTrain, EvalModel, EvalStage, ExportStage,
        GrpoStage, MergeStage, ModelStage, PpoStage, PreferencesStage, PretrainStage, RewardStage, RewardTrain,
        RlStageBase, RlTrain, SftStage, SftTrain, Stage, StageBase)
