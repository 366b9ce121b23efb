"""Evaluation reports: the comparison table, metric-per-model plots and every stage's training
curves, written by the eval stage and rebuilt from MLflow for any past run by `llmlab report`.

    write_report(results, histories, out_dir)    # report.md, metrics.png, training_curves.png
    llmlab report RUN_ID_OR_PIPELINE [--out DIR]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_text

CURVES = ("train/loss", "eval/loss")  # the training curves drawn per stage
BARS = (("eval/ppl", "held-out perplexity"), ("exact_match", "exact match, held-out tasks"),
        ("preference_accuracy", "preference accuracy, held-out pairs"), ("reward_mean", "mean reward"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(results: dict[str, Any], out: Path) -> Path:
    """One bar chart per metric the eval measured, a bar per model (unigram baseline on perplexity)."""
    plt = _plt()
    names = list(results["model_order"])
    shown = [(k, label) for k, label in BARS if all(k in results["models"][n] for n in names)]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], shown):
        ax.bar(names, [results["models"][n][key] for n in names])
        if key == "eval/ppl":
            ax.scatter(names, [results["models"][n]["unigram_ppl"] for n in names], color="red", zorder=3,
                       label="unigram baseline")
            ax.set_yscale("log")
            ax.legend()
        ax.set_title(label)
    fig.suptitle(f"{results['pipeline']}: {results['stage']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_curves(histories: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> Path | None:
    """Each stage's train/eval loss against optimizer step (stages without curves are skipped)."""
    stages = [s for s, h in histories.items() if any(h.get(k) for k in CURVES)]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for key in CURVES:
            points = histories[stage].get(key) or []
            if points:
                ax.plot(*zip(*points), label=key, marker="o" if key.startswith("eval") else None)
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(results: dict[str, Any], histories: dict[str, dict[str, list[tuple[int, float]]]], out_dir: Path) -> list[Path]:
    """report.md (+ report.html), metrics.png and training_curves.png in `out_dir`; returns the files."""
    from llmlab.evaluate import render_report

    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_report(results)
    files = [plot_metrics(results, out_dir / "metrics.png")]
    curves = plot_curves(histories, out_dir / "training_curves.png")
    text += "\n![metrics](metrics.png)\n"
    if curves:
        files.append(curves)
        text += "\n![training curves](training_curves.png)\n"
    atomic_write_text(out_dir / "report.md", text)
    html = "<html><body><pre>" + text.replace("&", "&amp;").replace("<", "&lt;") + "</pre>"
    html += "".join(f'<img src="{f.name}">' for f in files) + "</body></html>"
    atomic_write_text(out_dir / "report.html", html)
    return [out_dir / "report.md", out_dir / "report.html", *files]
