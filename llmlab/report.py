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
# an RL stage's loss hovers near zero whatever happens: it is drawn by what it optimises instead
RL_CURVES = ("rl/reward_mean", "eval/reward_mean", "eval/exact_match")
HISTORY_KEYS = CURVES + RL_CURVES  # what `llmlab.tracking.stage_histories` fetches for the report
BARS = (("eval/ppl", "held-out text perplexity"), ("exact_match", "exact match, held-out tasks"),
        ("preference_accuracy", "preference accuracy, held-out pairs"), ("reward_mean", "mean reward"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def benchmark_metrics(models: dict[str, dict[str, Any]]) -> list[str]:
    """The `bench/<task>/<metric>` scores the models have, in order (standard errors and contamination apart)."""
    keys = {k for m in models.values() for k in m if k.startswith("bench/")}
    return sorted(k for k in keys if not k.endswith(("_stderr", "/contamination")))


def _distinct(shown: list[tuple[str, str]], values) -> list[tuple[str, str]]:
    """(key, label) pairs with one entry per distinct series: a key whose values equal an earlier
    one's is not drawn again, its name joins that one's label (`a = b`)."""
    out: list[list] = []
    for key, label in shown:
        same = next((o for o in out if values(o[0]) == values(key)), None)
        if same is not None:
            same[1] += f" = {label}"
        else:
            out.append([key, label])
    return [(k, label) for k, label in out]


def plot_metrics(results: dict[str, Any], out: Path) -> Path:
    """One bar chart per metric the eval measured, a bar per model (unigram baseline on perplexity;
    95% intervals on the proportions, one standard error on benchmark scores)."""
    plt = _plt()
    names = list(results["model_order"])
    models = results["models"]
    shown = [(k, label) for k, label in BARS if all(k in models[n] for n in names)]
    shown = _distinct(shown, lambda key: [models[n][key] for n in names])
    shown += [(k, k[len("bench/"):]) for k in benchmark_metrics(models) if all(k in models[n] for n in names)]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(4.5 * max(1, len(shown)), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], shown):
        values = [models[n][key] for n in names]
        intervals = [models[n].get(f"{key}_ci") for n in names]
        stderr = [models[n].get(f"{key}_stderr") for n in names]
        if all(intervals):
            errors = [[v - ci[0] for v, ci in zip(values, intervals)], [ci[1] - v for v, ci in zip(values, intervals)]]
            ax.bar(names, values, yerr=errors, capsize=4)
        elif all(e is not None for e in stderr):
            ax.bar(names, values, yerr=stderr, capsize=4)
        else:
            ax.bar(names, values)
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


def plot_training_curves(histories: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> Path | None:
    """Each training stage's curves against optimizer step: train/eval loss, or for an RL stage its
    rollouts' mean reward and its held-out reward and exact match (stages without curves skipped)."""
    drawn = {}
    for stage, h in histories.items():
        keys = RL_CURVES if any(h.get(k) for k in RL_CURVES) else CURVES
        if any(h.get(k) for k in keys):
            drawn[stage] = keys
    if not drawn:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.5 * len(drawn), 3.5), squeeze=False)
    for ax, (stage, keys) in zip(axes[0], drawn.items()):
        present = [(k, k) for k in keys if histories[stage].get(k)]
        for key, label in _distinct(present, lambda k: histories[stage][k]):  # the exact_match reward: one line, both names
            ax.plot(*zip(*histories[stage][key]), label=label, marker="o" if key.startswith("eval") else None)
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward / exact match" if keys == RL_CURVES else "loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _with_ci(m: dict, key: str) -> str:
    """'0.345 (0.28-0.41)': a proportion with its 95% interval, '–' when not measured."""
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.3f} ({ci[0]:.2f}-{ci[1]:.2f})" if ci else f"{m[key]:.3f}"


def _benchmark_table(models: dict[str, dict[str, Any]], ngram: int) -> list[str]:
    """lm-evaluation-harness scores: a row per model, a column per task and metric (± one standard
    error), and each model's contamination per task where its training data is known."""
    keys = benchmark_metrics(models)
    if not keys:
        return []
    lines = ["", "## Benchmarks (lm-evaluation-harness)", "",
             "| model | " + " | ".join(k[len("bench/"):] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in models.items():
        cells = []
        for k in keys:
            err = m.get(f"{k}_stderr")
            cells.append("–" if k not in m else f"{m[k]:.3f} ± {err:.3f}" if err is not None else f"{m[k]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tasks = sorted({k.split("/")[1] for k in keys})
    if any(f"bench/{t}/contamination" in m for m in models.values() for t in tasks):
        lines += ["", f"Contamination: the share of each task's documents whose word {ngram}-grams occur in the training "
                  f"data upstream of the model (a shorter document: a training example that begins with it).", "",
                  "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name, m in models.items():
            cells = [f"{m[f'bench/{t}/contamination']:.1%}" if f"bench/{t}/contamination" in m else "–" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _sources(results: dict[str, Any], key: str) -> str:
    paths = [p.get("path", p) if isinstance(p, dict) else p for p in results.get(key, [])]
    return ", ".join(f"`{p}`" for p in paths) or "–"


def above_unigram(models: dict[str, dict[str, Any]]) -> list[str]:
    """Models whose held-out text perplexity is above the unigram baseline: on that text they predict
    worse than token frequencies alone."""
    return [name for name, m in models.items() if "eval/ppl" in m and "unigram_ppl" in m and m["eval/ppl"] > m["unigram_ppl"]]


def render_report(results: dict[str, Any]) -> str:
    """A Markdown report: what each metric was measured on, one row per model (proportions with 95%
    Wilson intervals), a warning for a model that no longer models the held-out text, exact match
    and preference accuracy per task family, then each model's sample generations."""
    models = {name: results["models"][name] for name in results["model_order"]}  # JSON files sort keys
    lines = [f"# Evaluation: {results['pipeline']} / {results['stage']}", "", "What each column was measured on:", ""]
    if "val_tokens" in results:
        lines.append(f"- **text loss, text perplexity**: the held-out share of {_sources(results, 'text_sources')} "
                     f"({results['val_tokens']:,} tokens per model: {results['batches']} batches x "
                     f"{results['batch_sequences']} x {results['seq_len']}); **unigram perplexity**: the same text under "
                     f"the token frequencies of the rest, the baseline any language model of it should beat")
    if "tasks" in results:
        lines.append(f"- **exact match**: {results['tasks']['prompts']} held-out task prompts from "
                     f"{_sources({'s': results['tasks'].get('sources', [])}, 's')}, greedy")
    if results.get("preferences"):
        lines.append(f"- **preference accuracy**: {results['preferences'].get('pairs', 0)} held-out pairs from "
                     f"{_sources(results, 'preference_sources')} (the chosen answer more likely than the rejected one)")
    lines += ["- intervals: 95% (Wilson)", ""]
    lines += ["| model | text loss | text perplexity | unigram perplexity | exact match | preference accuracy | mean reward |",
              "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        reward = f"{m['reward_mean']:.3f}" if "reward_mean" in m else "–"
        text = (f"{m['eval/loss']:.4f} | {m['eval/ppl']:,.2f} | {m['unigram_ppl']:,.2f}" if "eval/loss" in m else "– | – | –")
        lines.append(f"| {name} | {text} | {_with_ci(m, 'exact_match')} | {_with_ci(m, 'preference_accuracy')} | {reward} |")
    worse = above_unigram(models)
    if worse:
        lines += ["", f"**Warning:** {', '.join(worse)} {'has' if len(worse) == 1 else 'have'} a text perplexity above the "
                      f"unigram baseline: on this held-out text {'it predicts' if len(worse) == 1 else 'they predict'} "
                      f"worse than token frequencies alone, so {'it' if len(worse) == 1 else 'they'} no longer "
                      f"model{'s' if len(worse) == 1 else ''} such text (after fine-tuning: it has forgotten what "
                      f"pretraining learned about it)."]
    lines += _benchmark_table(models, results.get("contamination_ngram", 13))
    for metric, title in (("exact_match", "Exact match"), ("preference_accuracy", "Preference accuracy")):
        families = sorted({f for m in models.values() for f in m.get(f"{metric}_by_family", {})})
        if families:
            lines += ["", f"## {title} per task family", "",
                      "| model | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
            for name, m in models.items():
                by = m.get(f"{metric}_by_family", {})
                cells = [f"{by[f]['value']:.3f} (n={by[f]['n']})" if f in by else "–" for f in families]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Samples (greedy)" if results["temperature"] == 0 else "## Samples", ""]
    for prompt_i, prompt in enumerate(results["prompts"]):
        lines.append(f"**Prompt:** `{prompt}`")
        lines.append("")
        for name, m in models.items():
            sample = m["samples"][prompt_i].replace("\n", "⏎")
            lines.append(f"- {name}: `{sample}`")
        lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Markdown's inline marks used in reports (`code`, **bold**) as HTML, everything else escaped."""
    import html
    import re

    out = []
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def markdown_to_html(text: str, images: dict[str, bytes] | None = None, title: str = "report") -> str:
    """A self-contained HTML page from the Markdown llmlab writes (headings, pipe tables, lists,
    paragraphs, images): tables rendered, images inlined from `images` (file name -> PNG bytes)."""
    import base64
    import html
    import re

    body: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</tbody></table>")
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        heading = re.match(r"(#{1,6}) (.*)", line)
        image = re.fullmatch(r"!\[([^]]*)\]\(([^)]+)\)", line.strip())
        if heading:
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            alt, src = image.groups()
            data = (images or {}).get(src)
            url = f"data:image/png;base64,{base64.b64encode(data).decode()}" if data is not None else html.escape(src)
            body.append(f'<figure><img alt="{html.escape(alt)}" src="{url}"></figure>')
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "th{background:#f3f3f3}code{background:#f6f6f6;padding:1px 3px}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def write_report(results: dict[str, Any], histories: dict[str, dict[str, list[tuple[int, float]]]], out_dir: Path) -> list[Path]:
    """report.md (for terminals), report.html (the same, rendered, plots inline), metrics.png and
    training_curves.png in `out_dir`; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_report(results)
    files = [plot_metrics(results, out_dir / "metrics.png")]
    curves = plot_training_curves(histories, out_dir / "training_curves.png")
    text += "\n![metrics](metrics.png)\n"
    if curves:
        files.append(curves)
        text += "\n![training curves](training_curves.png)\n"
    atomic_write_text(out_dir / "report.md", text)
    page = markdown_to_html(text, {f.name: f.read_bytes() for f in files},
                            title=f"Evaluation: {results['pipeline']} / {results['stage']}")
    atomic_write_text(out_dir / "report.html", page)
    return [out_dir / "report.md", out_dir / "report.html", *files]
