"""Comparing the branches of a sweep: picking one for a `select`, and laying them side by side on
the pipeline's MLflow run.

    choice = choose_branch(spec, "release", {"eval[beta=0.1]": result, ...})   # -> Choice
    log_choice(tracker_run, choice)               # tag, metric series, table and plot on the parent run
    log_branch_tables(tracker_run, spec, results) # every swept stage's branches with their metrics

A selection compares the judge stage's branches on one metric (max or min) and names the winner;
ties go to the branch declared first. Nothing here imports torch or prefect.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmlab.errors import UserError
from llmlab.spec import Pipeline


class SelectionFailed(UserError):
    """No branch of the judge stage reported the selection metric."""


@dataclass
class Choice:
    stage: str  # the stage that selects
    judge: str  # the stage whose branches were compared
    metric: str
    mode: str
    winner: str  # the judge's winning branch
    label: str  # its branch label (the swept values)
    table: list[dict[str, Any]]  # one row per branch: branch, label, values, metric value, chosen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        fields = list(dict.fromkeys(k for row in self.table for k in row["values"]))
        head = f"| branch | {' | '.join(fields)} | {self.metric} | |"
        lines = [f"`{self.stage}` takes the branch of `{self.judge}` with the {self.mode} {self.metric}:", "",
                 head, "|" + "---|" * (len(fields) + 3)]
        for row in self.table:
            value = "–" if row["value"] is None else f"{row['value']:.4g}"
            cells = " | ".join(str(row["values"].get(f, "")) for f in fields)
            lines.append(f"| {row['label']} | {cells} | {value} | {'**chosen**' if row['chosen'] else ''} |")
        return "\n".join(lines)


def choose_branch(spec: Pipeline, stage: str, judged: dict[str, dict]) -> Choice:
    """The branch of the judge stage (`judged`: concrete branch -> StageResult dict, the ones that
    ran) with the best selection metric."""
    selection = spec.selection(stage)
    if selection is None:
        raise ValueError(f"stage '{stage}' does not select")
    rows = []
    for branch in selection.options:
        if branch not in judged:
            continue  # narrowed away (--param sweep=...)
        variant, values = spec.variant(branch), spec.branch_values(branch)
        value = judged[branch]["metrics"].get(selection.metric)
        ok = isinstance(value, (int, float)) and not math.isnan(value)
        rows.append({"branch": branch, "label": variant.label, "values": values,
                     "value": float(value) if ok else None, "chosen": False,
                     "run_id": judged[branch].get("mlflow_run_id")})
    scored = [r for r in rows if r["value"] is not None]
    if not scored:
        reported = sorted(next(iter(judged.values()))["metrics"]) if judged else []
        raise SelectionFailed(f"stage '{stage}': no branch of '{selection.stage}' reported '{selection.metric}' to select "
                              f"by (it reports: {', '.join(reported[:12]) or 'nothing'}); set `select.metric` to one of those")
    sign = 1 if selection.mode == "max" else -1
    best = max(scored, key=lambda r: sign * r["value"])  # max() keeps the first of equals: declared order
    best["chosen"] = True
    return Choice(stage, selection.stage, selection.metric, selection.mode, best["branch"], best["label"], rows)


def _plot(path: Path, title: str, labels: list[str], values: list[float], chosen: int | None, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 2), 3.6))
    colors = ["tab:green" if i == chosen else "tab:blue" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), [label.replace(",", ",\n") for label in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def log_choice(run: Any, choice: Choice) -> None:
    """The decision on the pipeline's run: tags naming the winner, the metric per branch as a series
    (step = branch order), the table (JSON and Markdown) and a bar plot."""
    key = _safe(choice.stage)
    run.set_tags({f"llmlab.select.{choice.stage}": choice.winner, f"llmlab.select.{choice.stage}.branch": choice.label,
                  f"llmlab.select.{choice.stage}.metric": f"{choice.mode} {choice.metric}"})
    for i, row in enumerate(choice.table):
        if row["value"] is not None:
            run.log_metrics({f"select/{key}/{_safe(choice.metric)}": row["value"]}, step=i)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / f"{key}.json").write_text(json.dumps(choice.to_dict(), indent=1))
        (folder / f"{key}.md").write_text(choice.markdown() + "\n")
        scored = [r for r in choice.table if r["value"] is not None]
        _plot(folder / f"{key}.png", f"{choice.stage}: {choice.mode} {choice.metric} of {choice.judge}",
              [r["label"] for r in scored], [r["value"] for r in scored],
              next(i for i, r in enumerate(scored) if r["chosen"]), choice.metric)
        for f in sorted(folder.iterdir()):
            run.log_artifact(f, "selections")
        run.flush()  # the series now, not when the pipeline's run closes


def branch_table(spec: Pipeline, base: str, results: dict[str, dict]) -> list[dict[str, Any]]:
    """Every finished branch of a fanned-out stage: its label, the swept values it follows, its run
    and its final metrics."""
    rows = []
    for branch in spec.graph.branches(base):
        if branch not in results:
            continue
        variant, values = spec.variant(branch), spec.branch_values(branch)
        r = results[branch]
        rows.append({"branch": branch, "label": variant.label, "values": values, "run_id": r.get("mlflow_run_id"),
                     "reused": bool(r.get("reused")), "metrics": r.get("metrics", {})})
    return rows


def log_branch_tables(run: Any, spec: Pipeline, results: dict[str, dict]) -> None:
    """For every stage that fanned out, a table of its branches on the pipeline's run
    (`branches/<stage>.json`), and its branches' final metrics as series over the branches
    (`branches/<stage>/<metric>`, step = branch order) so one chart lines them up."""
    fanned = list(dict.fromkeys(spec.base_stage(n) for n in spec.graph.order if spec.variant(n).assign))
    with tempfile.TemporaryDirectory() as tmp:
        for base in fanned:
            rows = branch_table(spec, base, results)
            if not rows:
                continue
            (Path(tmp) / f"{_safe(base)}.json").write_text(json.dumps(rows, indent=1))
            run.log_artifact(Path(tmp) / f"{_safe(base)}.json", "branches")
            common = set.intersection(*[set(r["metrics"]) for r in rows])
            for metric in sorted(common)[:40]:
                for i, row in enumerate(rows):
                    value = row["metrics"][metric]
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        run.log_metrics({f"branches/{_safe(base)}/{_safe(metric)}": float(value)}, step=i)
