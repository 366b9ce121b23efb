"""Promotion: whether the model a pipeline just registered takes over an MLflow alias (`champion`).

    metrics = promotion_metrics(spec, results, chosen)           # what the gates read
    decision = promote(client, spec, "tiny-sweep", version, metrics)   # -> Decision, alias moved or not

The spec's `promote: {model, alias, gates, metrics_from}` names the stage whose model is registered,
the alias, and the gates. The metrics a gate reads are the stage's own plus, with `metrics_from`,
what that eval stage reported for the model (its `dpo/exact_match` read as `exact_match`; the
branch of a fanned-out eval that judged the selection). `champion.<metric>` is the metric recorded
on the version that holds the alias now (tags `llmlab.metric.<name>` on every version llmlab
registers); while no version holds it, those gates pass and only absolute ones decide. The
decision, with both sides' numbers, goes onto the pipeline's run. Imports neither torch nor prefect.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from llmlab.gates import evaluate_gates
from llmlab.spec import Pipeline

METRIC_TAG = "llmlab.metric."


@dataclass
class Decision:
    registered_model: str
    alias: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None  # who held the alias before the decision
    gates: list[dict] = field(default_factory=list)  # {gate, value, bound, holds}
    metrics: dict[str, float] = field(default_factory=dict)  # the candidate's, as the gates read them
    champion_metrics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self) -> str:
        return (f"promotion: {self.registered_model} version {self.version} "
                f"{'is now' if self.promoted else 'did not become'} '{self.alias}' — {self.reason}")


def promoted_stage(spec: Pipeline) -> str | None:
    """The concrete stage whose model `promote.model` names (its last round, for a repeated stage)."""
    if spec.promote is None:
        return None
    names = spec.expand_names([spec.promote.model])
    return names[-1] if names else None


def promotion_metrics(spec: Pipeline, results: dict[str, dict], chosen: dict[str, str]) -> dict[str, float]:
    """The candidate's metrics as promotion gates read them (see the module docstring); `chosen`
    maps each selecting stage to the judge branch it took."""
    stage = promoted_stage(spec)
    if stage is None or stage not in results:
        return {}
    metrics = {k: float(v) for k, v in results[stage]["metrics"].items() if _finite(v)}
    source = spec.promote.metrics_from  # type: ignore[union-attr]
    if source is None:
        return metrics
    branches = spec.expand_names([source])
    judged = [b for b in branches if b in chosen.values()]
    evals = judged or (branches if len(branches) == 1 else [])
    if not evals or evals[0] not in results:
        return metrics
    ev = evals[0]
    own = {stage, *spec.dependencies(stage, chosen.get(stage)).values()}  # the model, or what it exports / merges
    for ref, concrete in spec.dependencies(ev, chosen.get(ev)).items():
        if concrete in own and ref != "tokenizer":
            prefix = f"{ref}/"
            for k, v in results[ev]["metrics"].items():
                if k.startswith(prefix) and _finite(v):
                    metrics.setdefault(k[len(prefix):], float(v))
    for k, v in results[ev]["metrics"].items():
        if _finite(v):
            metrics.setdefault(k, float(v))
    return metrics


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def champion_of(client: Any, name: str, alias: str) -> Any | None:
    """The model version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def recorded_metrics(version: Any) -> dict[str, float]:
    out = {}
    for k, v in (version.tags or {}).items():
        if k.startswith(METRIC_TAG):
            try:
                out[k[len(METRIC_TAG):]] = float(v)
            except ValueError:
                pass
    return out


def promote(client: Any, spec: Pipeline, name: str, version: str, metrics: dict[str, float]) -> Decision:
    """Move `promote.alias` to `version` when every gate holds against the current holder."""
    assert spec.promote is not None
    alias = spec.promote.alias
    holder = champion_of(client, name, alias)
    if holder is not None and str(holder.version) == str(version):
        return Decision(name, alias, str(version), True, "it already holds the alias (the same model)", str(version),
                        metrics=metrics, champion_metrics=recorded_metrics(holder))
    champion = recorded_metrics(holder) if holder is not None else None
    evaluated = evaluate_gates(spec.promote.gates, metrics, None, champion)
    failures = [f for _, f in evaluated if f]
    rows = [row for row, _ in evaluated]
    before = str(holder.version) if holder is not None else None
    if failures:
        return Decision(name, alias, str(version), False, "; ".join(failures) + (f" (version {before} stays '{alias}')"
                                                                                 if before else ""),
                        before, rows, metrics, champion)
    client.set_registered_model_alias(name, alias, str(version))
    reason = (f"every gate holds against version {before}" if before else "first version with this alias; its absolute "
              "gates hold") if spec.promote.gates else "no gates"
    return Decision(name, alias, str(version), True, reason, before, rows, metrics, champion)
