"""Reward functions: the built-ins, loading "module:function" references with clear errors, and a
sequence-classification reward model scoring the same in batches as one by one."""

import textwrap

import pytest
import torch

from llmlab.rewards import (
    REWARD_FUNCTIONS,
    RewardModel,
    format_reward,
    length_penalty_reward,
    load_reward,
)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(1)


def test_exact_match_builtin():
    fn = load_reward("exact_match")
    assert fn is REWARD_FUNCTIONS["exact_match"]
    scores = fn(["2+2=", "rev c a t", "1+1="], [" 4<|im_end|>junk", "t a c", "3"],
                answers=["4", "t a c", "2"])
    assert scores == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="answers"):
        fn(["p"], ["c"])


def test_partial_match_builtin_gives_a_share_of_right_characters_and_one_only_at_an_exact_match():
    fn = load_reward("partial_match")
    assert fn is REWARD_FUNCTIONS["partial_match"]
    comps = [" 1234<|im_end|>junk", "1235", "123", "12345", "4321", "", "1234 "]
    scores = fn([""] * len(comps), comps, answers=["1234"] * len(comps))
    assert scores == [1.0, 0.75, 0.75, 0.8, 0.0, 0.0, 1.0]
    exact = load_reward("exact_match")([""] * len(comps), comps, answers=["1234"] * len(comps))
    assert [s == 1.0 for s in scores] == [e == 1.0 for e in exact]
    with pytest.raises(ValueError, match="answers"):
        fn(["p"], ["c"])


def test_format_builtin():
    completions = ["42<|im_end|>", "42", "", "   <|im_end|>", "4<|im_start|>user", "<|pad|>x",
                   "ok<|eos|><|im_start|>trailing after the end is ignored"]
    assert format_reward([""] * len(completions), completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
                                                                    1.0]


def test_length_penalty_builtin():
    comps = ["a" * 5, "a" * 10, "a" * 15, "a" * 20 + "<|im_end|>" + "b" * 50]
    assert length_penalty_reward([""] * 4, comps, target_length=10) == [0.0, 0.0, -0.5, -1.0]
    assert length_penalty_reward(["", ""], ["abc", "abc"], target_length=[2, 3]) == [-0.5, 0.0]
    assert load_reward("length_penalty")(["p"], ["x" * 64]) == [0.0]  # default target 64
    with pytest.raises(ValueError, match="target_length"):
        length_penalty_reward([""], ["a"], target_length=0)


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "llmlab_test_my_rewards.py").write_text(textwrap.dedent("""
        def brevity(prompts, completions, **kw):
            return [-float(len(c)) for c in completions]

        def no_kwargs(prompts, completions):
            return [0.0] * len(completions)

        def one_arg(completions, **kw):
            return [0.0] * len(completions)

        NOT_A_FUNCTION = 3
    """))
    (tmp_path / "llmlab_test_broken_rewards.py").write_text("import llmlab_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "llmlab_test_my_rewards"


def test_module_function_loads(reward_module):
    fn = load_reward(f"{reward_module}:brevity")
    assert fn(["p", "q"], ["ab", "abcd"], answers=["x", "y"]) == [-2.0, -4.0]


def test_missing_module_is_clear(reward_module):
    with pytest.raises(ImportError, match=r"reward function 'nope_mod:f': no module named "
                                          r"'nope_mod' — is it importable from the project folder"):
        load_reward("nope_mod:f")


def test_missing_dependency_of_module_is_named(reward_module):
    with pytest.raises(ImportError, match="llmlab_no_such_dependency"):
        load_reward("llmlab_test_broken_rewards:f")


def test_missing_function_is_clear(reward_module):
    with pytest.raises(AttributeError, match=r"has no attribute 'brevty'.*brevity"):
        load_reward(f"{reward_module}:brevty")


def test_not_callable_is_clear(reward_module):
    with pytest.raises(TypeError, match=r"NOT_A_FUNCTION is a int, not a function; it must "
                                        r"accept \(prompts, completions, \*\*kwargs\)"):
        load_reward(f"{reward_module}:NOT_A_FUNCTION")


@pytest.mark.parametrize("name, problem", [("no_kwargs", "no \\*\\*kwargs"),
                                           ("one_arg", "two positional arguments")])
def test_wrong_signature_is_clear(reward_module, name, problem):
    with pytest.raises(TypeError, match=rf"reward function '{reward_module}:{name}' has "
                                        rf"signature .*{problem}.*must accept"):
        load_reward(f"{reward_module}:{name}")


def test_unknown_reference_is_clear(tmp_path):
    with pytest.raises(ValueError, match=r"unknown reward 'exactmatch': not a built-in "
                                         r"\(exact_match, partial_match, numeric_match, format, length_penalty\)"):
        load_reward("exactmatch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        load_reward(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from llmlab.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("rm")
    texts = [f"{a}+{b}={a + b} rev c a t is t a c" for a in range(30) for b in range(10)]
    tok = train_tokenizer(texts, 300, out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, num_labels=1,
                         pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(out)
    return out


def test_reward_model_batches_equal_one_by_one(reward_model_dir):
    rm = load_reward(str(reward_model_dir))
    assert isinstance(rm, RewardModel)
    assert all(not p.requires_grad for p in rm.model.parameters()) and not rm.model.training
    prompts = ["1+2=", "rev c a t", "7+5=", "sort 372", "x"]
    completions = ["3<|im_end|>", " t a c and a much longer tail of text here", "12", "237", ""]
    rm.batch_size = 3
    batched = rm(prompts, completions)
    rm.batch_size = 1
    single = rm(prompts, completions)
    assert len(batched) == 5 and all(isinstance(s, float) for s in batched)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len({round(s, 6) for s in single}) > 1  # scores depend on the text


def test_reward_model_truncation_keeps_the_completion(reward_model_dir):
    rm = RewardModel(str(reward_model_dir), max_length=8)
    shared = "1+2=3 " * 50
    # Only the starts differ: left truncation keeps the same last 8 tokens for both.
    a, b, c = rm(["rev c a t " + shared, "sort 372 " + shared, shared], ["7+5=12"] * 3)
    assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)
    assert rm(["x"], ["7+5=12"])[0] != pytest.approx(rm(["x"], ["7+5=13"])[0], abs=1e-7)


def test_a_reward_model_renders_the_conversation_with_its_own_chat_template(reward_model_dir):
    """Given the prompt's conversation, a reward model scores it rendered with its own template and
    tokenizer, the completion as the assistant's turn, read at that turn's end — the same logit a
    direct forward pass over that rendering gives; the policy's own markup does not leak in."""
    from transformers import AutoModelForSequenceClassification

    from llmlab.tokenizer import load_tokenizer

    rm = RewardModel(str(reward_model_dir))
    tok = load_tokenizer(str(reward_model_dir))
    assert tok.chat_template
    conversations = [[{"role": "user", "content": "1+2="}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev c a t"}]]
    completions = ["3<|im_end|>", "t a c"]  # the first stopped on the policy's end-of-turn marker
    got = rm(["<|policy markup|>", "<|policy markup|>"], completions, prompt_messages=conversations)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for score, messages, completion in zip(got, conversations, ["3", "t a c"]):
        text = tok.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
        ids = tok(text.rstrip("\n"), add_special_tokens=False)["input_ids"]
        assert ids[-1] == end  # the score is read at the assistant turn's end-of-turn token
        with torch.no_grad():
            direct = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(direct, abs=1e-5)
    # without the conversation, the text as given is scored (and the markup changes the score)
    assert rm(["<|policy markup|>"], ["3"])[0] != pytest.approx(got[0], abs=1e-6)


@pytest.mark.parametrize("completion,answer,expected", [
    ("She sold 48 + 24 = 72 clips.\n#### 72<|im_end|>", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("The answer is 1,234.", "#### 1234", 1.0),  # commas and prose around the final number
    ("It costs $18.00 in total", "#### 18", 1.0),
    ("First 5, then 7, so 12", "12", 1.0),  # the last number, without a #### marker
    ("#### 71", "#### 72", 0.0),
    ("no number at all", "#### 72", 0.0),
    ("-3 degrees", "#### -3", 1.0),
])
def test_numeric_match_reads_the_final_number(completion, answer, expected):
    assert load_reward("numeric_match")(["q"], [completion], answers=[answer]) == [expected]
