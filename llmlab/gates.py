"""Eval gates: conditions on a stage's metrics, checked when the stage ends.

    gates: ["eval/ppl < 40", "exact_match >= previous", "dpo/exact_match >= merge/exact_match"]

A gate is `METRIC OP BOUND`: OP is one of < <= > >= ==; BOUND is a number, `previous` (the same
metric of the stage this one starts `from`), `champion.<metric>` (in a pipeline's `promote` gates:
that metric of the model version holding the alias; such a gate passes while no version holds it),
or another metric of this stage. A failed gate fails
the stage with a message naming the metric, its value and the bound, so the pipeline stops before
spending compute on what follows. Imports nothing heavy (the spec validates gates with it).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from llmlab.errors import UserError

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}
GATE = re.compile(r"^\s*(?P<metric>[\w./-]+)\s*(?P<op><=|>=|==|<|>)\s*(?P<bound>[\w./+-]+)\s*$")


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    bound: str  # a number, "previous", or a metric name


class GateFailed(UserError):
    """One or more gates of a stage failed; the message lists each with its value and bound."""


def parse_gate(text: str) -> Gate:
    m = GATE.match(text)
    if not m:
        raise ValueError(f"gate '{text}' is not `METRIC OP BOUND` (OP one of {' '.join(OPS)}), e.g. 'eval/ppl < 40'")
    return Gate(text.strip(), m["metric"], m["op"], m["bound"])


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def check_gates(gates: list[str], metrics: dict[str, float], previous: dict[str, float] | None,
                champion: dict[str, float] | None = None) -> list[str]:
    """Failure messages of the gates that do not hold (empty when all pass)."""
    return [f for _, f in evaluate_gates(gates, metrics, previous, champion) if f]


def evaluate_gates(gates: list[str], metrics: dict[str, float], previous: dict[str, float] | None,
                   champion: dict[str, float] | None = None) -> list[tuple[dict, str | None]]:
    """Each gate with what it compared ({gate, value, bound, holds}) and its failure message (None: held)."""
    return [_evaluate(parse_gate(text), metrics, previous, champion) for text in gates]


def _evaluate(gate: Gate, metrics: dict[str, float], previous: dict[str, float] | None,
              champion: dict[str, float] | None) -> tuple[dict, str | None]:
    row: dict = {"gate": gate.text, "value": metrics.get(gate.metric), "bound": None, "holds": False}
    if gate.metric not in metrics:
        return row, (f"gate '{gate.text}': the stage reported no metric '{gate.metric}' "
                     f"(it reported: {', '.join(sorted(metrics)) or 'none'})")
    bound = _number(gate.bound)
    where = gate.bound
    if bound is None and gate.bound.startswith("champion."):
        name = gate.bound[len("champion."):]
        if champion is None:
            row.update(holds=True, bound="no champion yet")
            return row, None
        if name not in champion:
            return row, f"gate '{gate.text}': the champion has no recorded '{name}'"
        bound, where = champion[name], f"champion's {name} = {champion[name]:.4g}"
    elif bound is None and gate.bound == "previous":
        if previous is None or gate.metric not in previous:
            return row, f"gate '{gate.text}': no previous stage reported '{gate.metric}'"
        bound, where = previous[gate.metric], f"previous = {previous[gate.metric]:.4g}"
    elif bound is None:
        if gate.bound not in metrics:
            return row, f"gate '{gate.text}': the stage reported no metric '{gate.bound}'"
        bound, where = metrics[gate.bound], f"{gate.bound} = {metrics[gate.bound]:.4g}"
    value = metrics[gate.metric]
    row.update(bound=bound, holds=bool(OPS[gate.op](value, bound)))
    if row["holds"]:
        return row, None
    return row, f"gate '{gate.text}' failed: {gate.metric} = {value:.4g}, bound {gate.op} {where}"
