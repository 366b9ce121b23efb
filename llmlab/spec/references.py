"""Rules between stages, checked on the raw YAML mapping before the graph is built: what `from`,
`reference_stage` and `reward_stage` may name.

    issues = reference_issues(raw)     # [(location, message)]: unknown or later stages, cycles,
                                       # a merge of a stage without adapters, a reward stage of the wrong kind

Never imports torch.
"""

from __future__ import annotations

import difflib
from typing import Iterator

from llmlab.spec.base import Loc
from llmlab.spec.graph import ROUND
from llmlab.spec.stages import REF_KEYS, STAGE_CLASSES


def reference_issues(raw: dict) -> Iterator[tuple[Loc, str]]:
    """`from` must name an earlier stage (or the tokenizer); no stage may depend on itself."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return
    seen = ["tokenizer"] if isinstance(raw.get("tokenizer"), dict) and "train" in raw["tokenizer"] else []
    names = list(stages)
    scratch = [n for n, b in stages.items() if isinstance(b, dict) and b.get("kind") == "pretrain" and not b.get("from")]
    if raw.get("tokenizer") is None and scratch:
        yield ("tokenizer",), (f"stage '{scratch[0]}' trains a model from scratch, which needs a tokenizer: add "
                               f"`tokenizer: {{train: {{vocab_size: 8192, data: [...]}}}}` to train one, or `name:` (hub) "
                               f"/ `path:` (folder) of an existing one (stages that start from a model use its own)")
    if "tokenizer" in names:
        yield ("stages", "tokenizer"), "the name 'tokenizer' is reserved for the tokenizer stage: rename this stage"
    for name in names:
        if any(c in str(name) for c in "[]#/;:,= "):
            yield ("stages", name), "stage names may not contain [ ] # / ; : , = or spaces (branches and rounds use them)"
    groups = raw.get("repeat")
    groups = [groups] if isinstance(groups, dict) else (groups if isinstance(groups, list) else [])
    rounds = {s: g.get("times") for g in groups if isinstance(g, dict) for s in (g.get("stages") or []) if isinstance(s, str)}
    for name, body in stages.items():
        src = body.get("from") if isinstance(body, dict) else None
        deps = [("from", d) for d in ([src] if isinstance(src, str) else (src or []))]
        for key in REF_KEYS:
            if isinstance(body, dict) and isinstance(body.get(key), str):
                deps.append((key, body[key]))
        for key, dep in deps:
            if not isinstance(dep, str):
                continue
            round_ref = ROUND.match(dep)
            if round_ref and round_ref["base"] in names:
                times = rounds.get(round_ref["base"])
                if times is None:
                    yield (("stages", name, key), f"'{dep}' names a round, but '{round_ref['base']}' is in no `repeat` group")
                    continue
                if not 1 <= int(round_ref["k"]) <= int(times):
                    yield (("stages", name, key), f"'{dep}': '{round_ref['base']}' runs rounds 1 to {times}")
                    continue
                if round_ref["base"] in rounds and name in rounds:
                    yield (("stages", name, key), f"'{dep}': a repeated stage reads its own round's stages by their names")
                    continue
                dep = round_ref["base"]
            if dep == name:
                yield (("stages", name, key), f"stage '{name}' cannot take its own output (a cycle)")
            elif dep in names and dep not in seen:
                yield (("stages", name, key), f"'{dep}' is declared after '{name}': a stage may only use earlier stages (declare '{dep}' first; cycles are not allowed)")
            elif dep not in names:
                near = difflib.get_close_matches(dep, [n for n in names if n != name], n=1)
                hint = f" — did you mean '{near[0]}'?" if near else f" (stages: {', '.join(names)})"
                yield (("stages", name, key), f"unknown stage '{dep}'{hint}")
            elif isinstance(stages.get(dep), dict):
                dep_kind = stages[dep].get("kind")
                if key == "reward_stage" and dep_kind != "reward":
                    yield (("stages", name, key), f"reward_stage '{dep}' is a {dep_kind} stage; name a stage of kind reward "
                                                  f"(or use `reward:` for a builtin, module:function or reward model)")
                elif key != "reward_stage" and dep_kind == "reward":
                    yield (("stages", name, key), f"'{dep}' is a reward model (a scalar head), not a language model: "
                                                  f"use it as `reward_stage` of a ppo or grpo stage")
                elif stages[dep].get("lora") and isinstance(body, dict) and body.get("kind") not in ("merge", "eval"):
                    yield (("stages", name, key), f"'{dep}' trains LoRA adapters, not a whole model: add a stage "
                                                  f"`{dep}_merged: {{kind: merge, from: {dep}}}` after it and use that here "
                                                  f"(an eval stage scores adapters as they are)")
        if isinstance(body, dict) and body.get("kind") == "dpo" and not body.get("data"):
            up = stages.get(src) if isinstance(src, str) else None
            if not (isinstance(up, dict) and up.get("kind") == "preferences"):
                yield (("stages", name, "data"), "dpo needs preference pairs: give `data`, or start `from` a preferences stage")
        if isinstance(body, dict) and body.get("kind") == "merge" and isinstance(src, str) and isinstance(stages.get(src), dict):
            up = stages[src]
            lora_kinds = [k for k, cls in STAGE_CLASSES.items() if "lora" in cls.model_fields]
            if up.get("kind") not in lora_kinds or not up.get("lora"):
                yield (("stages", name, "from"), f"merge needs adapters, but stage '{src}' has none "
                        f"(it is {up.get('kind')}{' without lora' if up.get('kind') in lora_kinds else ''}): merge a "
                        f"stage with a lora block ({', '.join(lora_kinds)})")
        seen.append(name)
