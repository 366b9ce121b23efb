"""Built-in tasks: right answers, deterministic splits that never overlap, plausible wrong answers."""

import itertools
import random
from collections import Counter

import pytest

from llmlab.data import tasks
from llmlab.data.tasks import (SPLIT_SIZES, SPLITS, TASK_SOURCES, TASKS, exact_match, forgotten_carry,
                               iter_examples, preference_rows, prompt_rows, prompt_split, sft_rows)


def solve(prompt: str) -> str:
    """An independent solver for every task's prompt."""
    if prompt.endswith("="):
        a, b = prompt[:-1].split("+")
        return str(int(a) + int(b))
    op, _, arg = prompt.partition(" ")
    if op == "rev":
        return " ".join(reversed(arg.split(" ")))
    if op == "sort":
        return "".join(sorted(arg))
    if op == "max":
        return max(arg)
    if op == "copy":
        return arg
    raise AssertionError(f"unknown prompt {prompt!r}")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_answers_are_right_and_splits_hold(task):
    for split in SPLITS:
        for name, prompt, answer in iter_examples(split, size=300, mix={task: 1.0}):
            assert name == task
            assert solve(prompt) == answer
            assert prompt_split(prompt) == split


def test_held_out_prompts_never_occur_in_training():
    train = {p for _, p, _ in iter_examples("train")}
    val = {p for _, p, _ in iter_examples("validation")}
    test = {p for _, p, _ in iter_examples("test")}
    # the default mix's prompt space is ~10,000 prompts (plus 8,000, successor 1,000, sort 1,000, add 100):
    # ~80% train
    assert len(train) > 5000 and len(val) > 150 and len(test) > 150
    assert not train & val and not train & test and not val & test
    # Also the whole prompt space of the small tasks: every prompt has exactly one split.
    for n in range(1000):
        assert prompt_split(f"{n}+1=") in SPLITS


def test_sizes_determinism_and_seed():
    for split in SPLITS:
        rows = list(TASK_SOURCES["tasks"](split))
        if split == "train":
            assert len(rows) == SPLIT_SIZES[split]
        else:  # each held-out prompt once: the split ends when the mix's held-out prompts are used up
            prompts = [r["messages"][0]["content"] for r in rows]
            assert 150 < len(rows) <= SPLIT_SIZES[split] and len(set(prompts)) == len(rows)
            # the small families' held-out prompts are all used (plus, ~800 per split, fills the rest)
            everything = {(t, p) for t, p, _ in iter_examples(split, size=20 * SPLIT_SIZES[split])}
            small = {p for t, p in everything if t != "plus"}
            assert small and small <= set(prompts)
    a = list(sft_rows("validation", seed=3))
    assert a == list(sft_rows("validation", seed=3))
    assert a != list(sft_rows("validation", seed=4))
    mix = {r["task"] for r in sft_rows("train", size=2000)}
    assert mix == set(tasks.DEFAULT_MIX)


def test_row_shapes():
    row = next(TASK_SOURCES["tasks"]("train"))
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][1]["content"] == row["answer"] == solve(row["messages"][0]["content"])
    p = next(TASK_SOURCES["tasks-prompts"]("test"))
    assert set(p) == {"prompt", "answer", "task"} and solve(p["prompt"]) == p["answer"]
    one = list(TASK_SOURCES["tasks-reverse"]("train"))[:50]
    assert {r["task"] for r in one} == {"reverse"}


@pytest.mark.parametrize("shape", ["preference", "prompts"])
def test_one_task_sources_of_every_row_shape(shape):
    """`tasks-preference-<task>` and `tasks-prompts-<task>`: one family alone, in the shape of the
    whole mix's source, from the same split's prompts (so a held-out prompt stays held out)."""
    whole = next(TASK_SOURCES[f"tasks-{shape}"]("train"))
    for task in ("plus", "sort"):
        for split in SPLITS:
            rows = list(itertools.islice(TASK_SOURCES[f"tasks-{shape}-{task}"](split), 200))
            assert rows and {r["task"] for r in rows} == {task}
            assert all(set(r) == set(whole) and prompt_split(r["prompt"]) == split for r in rows)
            assert all(r.get("chosen", r.get("answer")) == solve(r["prompt"]) for r in rows)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_rejected_answers_are_wrong_but_plausible(task):
    rows = list(preference_rows("train", size=400, mix={task: 1.0}))
    for r in rows:
        assert r["chosen"] == solve(r["prompt"])
        assert r["rejected"] != r["chosen"]
        assert not exact_match(r["rejected"], r["chosen"])
        # plausible: same kind of answer, about the same length
        assert abs(len(r["rejected"]) - len(r["chosen"])) <= 1
        assert r["rejected"].replace(" ", "").isdigit() == r["chosen"].replace(" ", "").isdigit()


def test_wrong_answer_edge_cases():
    rng = random.Random(0)
    for prompt, answer in [("rev a a a", "a a a"), ("sort 999", "999"), ("max 0000", "0"),
                           ("copy z z z", "z z z"), ("0+0=", "0"), ("999+1=", "1000"), ("999+9=", "1008"),
                           ("0+2=", "2")]:
        task = {"rev": "reverse", "sort": "sort", "max": "max", "copy": "copy"}.get(prompt.split()[0], "add")
        for name in ([task, "plus"] if task == "add" and not prompt.endswith("+1=") else [task]):
            for _ in range(20):
                assert tasks.wrong_answer(name, prompt, answer, rng) != answer


@pytest.mark.parametrize("prompt, dropped", [("347+5=", "342"), ("999+9=", "998"), ("5+5=", "0"), ("340+5=", None),
                                             ("13+6=", None)])
def test_forgotten_carry_drops_the_units_carry_and_only_then(prompt, dropped):
    assert forgotten_carry(prompt) == dropped


def test_plus_rejected_answers_are_the_forgotten_carry_or_off_by_one():
    """plus ("347+5=" -> "352"): the rejected answer is the sum with its carry dropped (342) on about
    half of the prompts that carry, else one off; both are what an undertrained model writes."""
    rows = list(preference_rows("train", size=2000, mix={"plus": 1.0}))
    kinds = {"carry": 0, "off": 0}
    for r in rows:
        n, d = (int(x) for x in r["prompt"][:-1].split("+"))
        assert 2 <= d <= 9 and 0 <= n < 1000
        no_carry = str(n - n % 10 + (n % 10 + d) % 10)
        if n % 10 + d >= 10 and r["rejected"] == no_carry:
            kinds["carry"] += 1
        else:
            assert abs(int(r["rejected"]) - int(r["chosen"])) == 1
            kinds["off"] += 1
    carries = sum(1 for r in rows if int(r["prompt"].split("+")[0]) % 10 + int(r["prompt"][:-1].split("+")[1]) >= 10)
    assert 0.35 * carries < kinds["carry"] < 0.65 * carries and kinds["off"] > 0


def test_sort_rejected_answers_are_sorted_with_one_digit_one_off():
    """sort ("sort 926" -> "269"): the rejected answer looks sorted and differs in one digit by one
    (269 -> 259), the last digit on about half of the rows: the miss the demo's models make, not an
    unsorted answer every model after sft ranks below the right one."""
    rows = list(preference_rows("train", size=2000, mix={"sort": 1.0}))
    last = 0
    for r in rows:
        chosen, rejected = r["chosen"], r["rejected"]
        assert chosen == "".join(sorted(r["prompt"].split()[1])) and rejected == "".join(sorted(rejected))
        assert len(rejected) == len(chosen) == 3 and rejected != chosen
        # one digit moved by one: the digit sums differ by one and all but one digit are shared
        assert abs(sum(map(int, rejected)) - sum(map(int, chosen))) == 1
        assert sum((Counter(chosen) & Counter(rejected)).values()) == 2
        last += rejected[:2] == chosen[:2]
    assert 0.4 * len(rows) < last < 0.9 * len(rows)


def test_exact_match_and_reward():
    assert exact_match(" 348\n", "348")
    assert not exact_match("3488", "348")
    assert not exact_match("", "348")
    assert exact_match("348<|im_end|>\n<|im_start|>user", "348")
    assert not exact_match("<|im_end|>348", "348")
    assert tasks.reward("t a c ", "t a c") == 1.0 and tasks.reward("tac", "t a c") == 0.0


def test_bad_split_and_mix():
    with pytest.raises(ValueError, match="unknown split"):
        next(sft_rows("dev"))
    with pytest.raises(ValueError, match="unknown tasks"):
        next(prompt_rows("train", mix={"nope": 1.0}))


def test_held_out_splits_hold_each_prompt_once_and_a_used_up_task_drops_out():
    rows = list(iter_examples("test", size=200))
    assert len({p for _, p, _ in rows}) == len(rows) == 200  # 200 rows are 200 different prompts
    add_test_prompts = {f"{a}+{b}=" for a in range(10) for b in range(10) if prompt_split(f"{a}+{b}=") == "test"}
    only_add = list(iter_examples("test", size=100, mix={"add": 1.0}))
    assert {p for _, p, _ in only_add} == add_test_prompts  # every one, then the task is used up
    mixed = [name for name, _, _ in iter_examples("test", size=60, mix={"add": 0.9, "sort": 0.1})]
    assert mixed.count("add") == len(add_test_prompts) and len(mixed) == 60  # sort fills the rest
    train = [p for _, p, _ in iter_examples("train", size=500, mix={"add": 1.0})]
    assert len(set(train)) < len(train)  # training draws repeat prompts
