"""What one stage of a pipeline (or a short chain of them) does to a given model folder.

    .venv/bin/python bench/stage_probe.py MODEL_DIR STAGE [STAGE ...] [--spec pipelines/tiny.yaml] [--seed 1234]
                     [--set STAGE.FIELD=YAML ...] [--preferences] [--set preferences.FIELD=YAML ...]
                     [--threads N] [--workdir bench-runs/stage-probe] [--json out.json]

Builds a spec of the named stages of `--spec` alone: the first starts from MODEL_DIR (`model:`, its
tokenizer read from the same folder), each next one `from` the one before, then the spec's eval
stage scores them with MODEL_DIR beside them as `start`. `--set` overrides a field of a stage
(dotted paths, YAML values: `--set dpo.train.max_steps=150`, `--set "dpo.data=[{path:
builtin:tasks-preference}]"`). `--preferences` puts an on-policy `preferences` stage in front of a
first dpo stage (samples from MODEL_DIR scored by the eval's reward; its pairs join dpo's `data`),
with its own `--set preferences....` fields. One fresh `llmlab run` process (bench/quality.py's
`run_one`); a dpo stage started this way from a pipeline run's sft folder reproduces that run's dpo
numbers on the machine that made them.

Prints exact match and preference accuracy of the start model and each stage, and each stage's change
over the model before it, in points: the rows of docs/benchmarks.md's "Where dpo's pairs should come
from" and the sft_weight table came from specs of this shape.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import ROOT, eval_stage, run_one  # noqa: E402

PREFERENCES = {"kind": "preferences", "data": [{"path": "builtin:tasks-prompts"}], "samples_per_prompt": 8,
               "temperature": 1.0, "max_new_tokens": 12, "max_prompts": 2000, "answer_as_chosen": True}


def set_field(stage: dict, dotted: str, value: str) -> None:
    *path, last = dotted.split(".")
    for key in path:
        stage = stage.setdefault(key, {})
        if not isinstance(stage, dict):
            sys.exit(f"--set {dotted}: '{key}' is not a block of fields; set it whole (--set STAGE.{key}=YAML)")
    try:
        stage[last] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        sys.exit(f"--set {dotted}: the value is not YAML ({err.__class__.__name__}); quote lists and blocks")


def probe_spec(spec: dict, model_dir: str, stages: list[str], sets: list[str], preferences: bool) -> dict:
    """The spec's `stages` chained from `model_dir`, then its eval stage with the start beside them."""
    unknown = [s for s in stages if s not in spec["stages"]]
    if unknown:
        sys.exit(f"no stage {unknown} in the spec (stages: {', '.join(spec['stages'])})")
    evaluated = eval_stage(spec)
    chain: dict[str, dict] = {}
    if preferences:
        if spec["stages"][stages[0]].get("kind") != "dpo":
            sys.exit("--preferences needs a dpo stage first")
        reward = spec["stages"][evaluated].get("reward", "exact_match")
        chain["preferences"] = {**copy.deepcopy(PREFERENCES), "model": model_dir, "reward": reward}
    for i, name in enumerate(stages):
        stage = copy.deepcopy(spec["stages"][name])
        stage.pop("from", None)
        stage.pop("model", None)
        if i == 0 and not preferences:
            stage["model"] = model_dir
        else:
            stage["from"] = list(chain)[-1]
        chain[name] = stage
    for item in sets:
        dotted, sep, value = item.partition("=")
        name, _, field = dotted.partition(".")
        if not sep or not field or name not in chain:
            sys.exit(f"--set {item!r}: give STAGE.FIELD=VALUE for one of {', '.join(chain)}")
        set_field(chain[name], field, value)
    ev = copy.deepcopy(spec["stages"][evaluated])
    ev["from"] = list(stages)
    ev["models"] = [{"name": "start", "path": model_dir}]
    return {"name": f"{spec.get('name', 'pipeline')}-probe", "tokenizer": {"path": model_dir},
            "stages": {**chain, evaluated: ev}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the start: a model folder (e.g. runs/tiny/sft/model)")
    parser.add_argument("stages", nargs="+", help="stages of --spec to run, in order, the first from MODEL")
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "tiny.yaml"))
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: the spec's)")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=YAML")
    parser.add_argument("--preferences", action="store_true", help="on-policy pairs from MODEL in front of dpo")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default="bench-runs/stage-probe")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model_dir = str(Path(args.model).resolve())
    if not (Path(model_dir) / "config.json").is_file():
        sys.exit(f"{args.model}: not a model folder (no config.json)")
    spec = yaml.safe_load(Path(args.spec).read_text())
    probe = probe_spec(spec, model_dir, args.stages, args.set, args.preferences)
    root = Path(args.workdir).resolve()
    shutil.rmtree(root / "probe", ignore_errors=True)  # one probe a folder: never reuse a stage of another
    seed = spec.get("seed", 0) if args.seed is None else args.seed
    results, seconds = run_one(probe, "probe", seed, args.threads, root)
    models = results["models"]
    order = ["start", *args.stages]
    print(f"{args.model} -> {' -> '.join(args.stages)}, seed {seed}, {args.threads} threads, {seconds / 60:.1f} min"
          + (f"; set {', '.join(args.set)}" if args.set else "") + ("; on-policy pairs" if args.preferences else ""))
    print("| model | exact match | preference accuracy | points over the model before (EM / PA) |")
    print("|---|---|---|---|")
    def shown(value: float | None, scale: float = 1.0, fmt: str = ".3f") -> str:
        return "–" if value is None else format(scale * value, fmt)

    for before, name in zip([None, *order], order):
        m = models[name]
        em, pa = m.get("exact_match"), m.get("preference_accuracy")  # an eval without tasks or pairs has none
        gains = [None if before is None or now is None else now - models[before].get(key, now)
                 for key, now in (("exact_match", em), ("preference_accuracy", pa))]
        change = "–" if before is None else f"{shown(gains[0], 100, '+.1f')} / {shown(gains[1], 100, '+.1f')}"
        print(f"| {name} | {shown(em)} | {shown(pa)} | {change} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": probe, "seed": seed, "seconds": seconds, "models": models}, indent=1))


if __name__ == "__main__":
    main()
