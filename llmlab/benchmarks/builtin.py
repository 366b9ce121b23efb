"""llmlab's own benchmarks, as lm-evaluation-harness tasks that run offline on any machine.

    folder = builtin_tasks("<|im_end|>")     # task YAMLs and their JSONL data, written once per end-of-turn text
    # then: lm_eval.tasks.TaskManager(include_path=str(folder))

- `llmlab_tasks_gen` — the built-in checkable tasks' test prompts (`builtin:tasks-prompts`, split
  test): greedy answers scored by exact match, as llmlab's own eval scores them (answers stop at the
  end of the assistant's turn; surrounding whitespace is ignored).
- `llmlab_tasks_mc` — the built-in preference pairs' test split (`builtin:tasks-preference`) as a
  two-way multiple choice: the right answer against a plausible wrong one, each scored as the
  assistant's whole turn (its end-of-turn text included), as llmlab's preference accuracy scores it.
- `llmlab_stdlib_mc` — real English: the true continuation of a held-out standard-library docstring
  among four (the other three continue other held-out docstrings). Only documents that every pretrain
  stage holds out at its default `val_fraction` (0.01) or more are used, never training rows, and an
  item whose text shares a 13-word run with any other docstring (stdlib docstrings repeat phrases) is
  left out, so a pretrain on `builtin:stdlib` has seen none of it.

Their data is generated here from llmlab's own generators and the installed Python, so nothing is
downloaded; the folder lives in the cache, keyed by the end-of-turn text the chat tasks end answers
with (a model family's chat template decides it) and this module's version.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterator

from llmlab.checkpoint import atomic_dir

VERSION = 1  # of the tasks' data and configs: a change makes a new folder
GEN, PAIRS, STDLIB = "llmlab_tasks_gen", "llmlab_tasks_mc", "llmlab_stdlib_mc"
CHAT_TASKS = frozenset({GEN, PAIRS})  # rendered with the model's chat template unless a spec says otherwise
BUILTIN_TASKS = (GEN, PAIRS, STDLIB)
MAX_ANSWER_TOKENS = 16  # the longest answer generated for a task prompt (the eval stage's own default)
STDLIB_HELD_OUT = 0.01  # documents held out at this share are held out by every pretrain at its default or more
STDLIB_FIRST_CUT = 12  # a docstring's first item continues it after this many words
STDLIB_CUT_EVERY = 16  # and the next items this many words further on each
STDLIB_CONTEXT_WORDS = 48  # a context is at most the last this many words before its cut
STDLIB_CONTINUATION_WORDS = 8  # the words each choice continues with
STDLIB_CHOICES = 4


def end_of_turn(tokenizer: Any) -> str:
    """The text a chat template puts after an assistant's answer, within the tokens llmlab trains and
    scores as the answer's (e.g. `<|im_end|>`): rendered around a probe answer and read back."""
    from llmlab.data.sft import tokenize_conversation

    probe = "7"
    ids, labels, _ = tokenize_conversation(tokenizer, [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": probe}], 1 << 30)
    answer = tokenizer.decode([t for t in labels if t >= 0], skip_special_tokens=False)
    return answer[answer.index(probe) + len(probe):] if probe in answer else ""


def _stdlib_items() -> Iterator[dict[str, Any]]:
    """(document number, context, true continuation) at every cut of every held-out docstring, in corpus order."""
    from llmlab.data.order import held_out
    from llmlab.data.sources import iter_texts

    held = (text for text in iter_texts("builtin:stdlib") if held_out(text, STDLIB_HELD_OUT))
    for number, text in enumerate(held):
        words = text.split()
        for cut in range(STDLIB_FIRST_CUT, len(words) - STDLIB_CONTINUATION_WORDS + 1, STDLIB_CUT_EVERY):
            yield {"document": number, "context": " ".join(words[max(0, cut - STDLIB_CONTEXT_WORDS):cut]),
                   "continuation": " " + " ".join(words[cut:cut + STDLIB_CONTINUATION_WORDS])}


def stdlib_docs() -> list[dict[str, Any]]:
    """The stdlib task's documents: a context, four continuations (the other three from other
    docstrings) and the index of the true one."""
    from llmlab.benchmarks.contamination import NgramIndex
    from llmlab.data.order import held_out
    from llmlab.data.sources import iter_texts

    rest = NgramIndex()
    rest.add_texts((t for t in iter_texts("builtin:stdlib") if not held_out(t, STDLIB_HELD_OUT)), set())
    items = [item for item in _stdlib_items() if not rest.seen(item["context"] + item["continuation"])]
    out = []
    for i, item in enumerate(items):
        rng = random.Random(f"llmlab-stdlib-{i}")
        others = rng.sample([j for j in range(len(items)) if items[j]["document"] != item["document"]], STDLIB_CHOICES - 1)
        choices = [items[j]["continuation"] for j in others]
        gold = rng.randrange(STDLIB_CHOICES)
        choices.insert(gold, item["continuation"])
        out.append({"context": item["context"], "choices": choices, "gold": gold})
    return out


def task_docs(eot: str) -> dict[str, list[dict[str, Any]]]:
    """Every built-in task's documents, the chat tasks' answers ended with `eot`."""
    from llmlab.data.tasks import TASK_SOURCES

    gen = [{"prompt": r["prompt"], "answer": r["answer"], "family": r["task"]} for r in TASK_SOURCES["tasks-prompts"]("test")]
    # the wrong answer first: a tie is scored as a miss, as llmlab's preference accuracy scores it
    pairs = [{"prompt": r["prompt"], "choices": [r["rejected"] + eot, r["chosen"] + eot], "gold": 1, "family": r["task"]}
             for r in TASK_SOURCES["tasks-preference"]("test")]
    return {GEN: gen, PAIRS: pairs, STDLIB: stdlib_docs()}


def _config(task: str, data: Path, eot: str) -> dict[str, Any]:
    common = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "metadata": {"version": VERSION}}
    if task == GEN:
        return {**common, "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": [eot] if eot else [], "max_gen_toks": MAX_ANSWER_TOKENS,
                                      "do_sample": False, "temperature": 0.0},
                "filter_list": [{"name": "none", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    text = "{{prompt}}" if task == PAIRS else "{{context}}"
    return {**common, "output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def builtin_tasks(eot: str) -> Path:
    """The folder of llmlab's benchmark tasks (YAML and JSONL) for answers ending with `eot`; written
    once, atomically, under the cache."""
    import yaml

    from llmlab.paths import cache_dir

    key = hashlib.sha256(json.dumps({"version": VERSION, "eot": eot}).encode()).hexdigest()[:12]
    folder = cache_dir("benchmarks") / key
    if (folder / "done").is_file():
        return folder
    with atomic_dir(folder) as tmp:
        for task, docs in task_docs(eot).items():
            (tmp / f"{task}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
            config = _config(task, folder / f"{task}.jsonl", eot)  # the data's final path, after the rename
            (tmp / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        (tmp / "done").write_text("")
    return folder
