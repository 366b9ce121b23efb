"""`llmlab init`'s wizard, driven by scripted answers: what it asks, what it re-asks, what it writes."""

import re
from pathlib import Path

import pytest
import yaml

from llmlab.model.config import LlmlabConfig
from llmlab.model.memory import count_parameters
from llmlab.spec import OPTIMIZER_CLASSES, SpecError, load_spec
from llmlab.wizard import PRESETS, estimates, run_wizard, write_spec


class Script:
    """A scripted `ask`: key -> answer, or key -> list of answers consumed in order; unscripted keys
    get the default (an empty answer). Records every (key, question, default) asked, and `say` lines."""

    def __init__(self, answers=None):
        self.answers = {k: list(v) if isinstance(v, list) else v for k, v in (answers or {}).items()}
        self.asked: list[str] = []
        self.questions: dict[str, str] = {}
        self.defaults: dict[str, str] = {}
        self.said: list[str] = []

    def ask(self, key, question, default):
        self.asked.append(key)
        self.questions[key], self.defaults[key] = question, default
        assert self.asked.count(key) < 10, f"{key} asked over and over"
        answer = self.answers.get(key, "")
        if isinstance(answer, list):
            return answer.pop(0) if answer else ""
        return answer

    def say(self, line):
        self.said.append(line)

    def run(self, defaults=False):
        return run_wizard(self.ask, self.say, defaults)


def test_defaults_write_a_valid_tiny_like_pipeline(tmp_path):
    script = Script()
    spec = script.run(defaults=True)
    assert script.asked == []  # --defaults asks nothing
    path = tmp_path / "p.yaml"
    write_spec(spec, path)
    text = path.read_text()
    assert text.startswith("#") and f"llmlab run {path}" in text.splitlines()[3]
    pipeline = load_spec(path)
    assert list(pipeline.stages) == ["pretrain", "sft", "merge", "dpo", "grpo", "eval"]
    assert pipeline.stages["sft"].lora.train_embeddings and pipeline.stages["dpo"].inputs == ["merge"]
    assert pipeline.tokenizer.train is not None
    assert pipeline.stages["eval"].inputs == ["pretrain", "sft", "dpo", "grpo"]
    assert pipeline.model.d_model == 128 and pipeline.model.n_layers == 4  # the tiny preset
    assert all(s.path.startswith("builtin:") for st in pipeline.stages.values() for s in getattr(st, "data", []))


def test_defaults_are_the_demos_recipe():
    """--defaults writes pipelines/tiny.yaml's stages: every field it sets, with its value."""
    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "tiny.yaml").read_text())["stages"]
    written = Script().run(defaults=True)["stages"]
    assert list(written) == list(demo)
    for name, block in demo.items():
        for key, value in block.items():
            if key == "train":
                assert {k: written[name]["train"][k] for k in value} == value, name
            else:
                assert written[name][key] == value, (name, key)


def test_every_stage_kind_the_wizard_offers_validates_wired_in_order(tmp_path):
    answers = {"stages": "pretrain, merge, preferences, ppo, grpo, eval"}
    spec = Script(answers).run()
    pipeline = write_spec(spec, tmp_path / "all.yaml")
    assert list(pipeline.stages) == ["pretrain", "sft", "merge", "preferences", "dpo", "reward", "grpo", "ppo", "eval"]
    assert pipeline.stages["sft"].lora is not None and pipeline.stages["dpo"].inputs == ["preferences"]
    assert pipeline.stages["ppo"].reward_stage == "reward" and pipeline.stages["grpo"].inputs == ["dpo"]
    assert pipeline.stages["eval"].inputs == ["pretrain", "sft", "dpo", "grpo", "ppo"]


def test_interactive_defaults_equal_defaults_mode():
    script = Script()
    assert script.run() == Script().run(defaults=True)
    assert script.asked[:3] == ["name", "size", "positional_encoding"]
    # the recommended architecture is the default, each choice with a one-line reason
    for key, rec in [("positional_encoding", "rope"), ("attention_type", "gqa"), ("norm_type", "rmsnorm"), ("activation", "swiglu")]:
        assert script.defaults[key] == rec and "recommended" in script.questions[key]


def test_chosen_optimizer_fields_only(tmp_path):
    script = Script({"stages": "pretrain, eval", "pretrain.optimizer": "lion", "pretrain.optimizer.beta2": "0.98",
                     "pretrain.max_steps": "50"})
    spec = script.run()
    asked_opt = {k.split(".")[-1] for k in script.asked if k.startswith("pretrain.optimizer.")}
    assert asked_opt == set(OPTIMIZER_CLASSES["lion"].model_fields) - {"name"}
    assert not any(k.startswith(("sft.", "dpo.")) for k in script.asked)
    for other in ("adamw", "sophia", "muon", "adafactor"):
        only_theirs = set(OPTIMIZER_CLASSES[other].model_fields) - set(OPTIMIZER_CLASSES["lion"].model_fields)
        assert not asked_opt & only_theirs
    assert "momentum decay" in script.questions["pretrain.optimizer.beta2"]  # the field's comment
    assert float(script.defaults["pretrain.lr"]) < 2e-3  # Lion: a smaller default lr
    path = tmp_path / "lion.yaml"
    write_spec(spec, path)
    pipeline = load_spec(path)
    assert list(pipeline.stages) == ["pretrain", "eval"]
    train = pipeline.stages["pretrain"].train
    assert train.optimizer.name == "lion" and train.optimizer.beta2 == 0.98
    assert train.max_steps == 50 and train.warmup_steps <= 50


def test_invalid_answers_are_reasked(tmp_path):
    script = Script({
        "name": ["has space", "ok-name"],
        "size": ["huge", "small"],
        "positional_encoding": ["ropee", "alibi"],
        "attention_type": "mha",
        "d_model": ["abc", "-4", "96"],
        "n_heads": ["5", "3"],  # 96 % 5 != 0
        "stages": ["pretrain,rlhf", "sft", "pretrain,merge,eval"],  # unknown; no pretrain; merge implies sft
        "pretrain.optimizer": ["rmsprop", "muon"],
        "pretrain.optimizer.ns_steps": ["2.5", "0", "3"],
        "pretrain.optimizer.ns_dtype": ["fp16", "fp32"],
        "pretrain.lr": ["fast", "0", "0.01"],
        "pretrain.batch_sequences": ["1.5", "8"],
        "sft.optimizer": "sophia",
        "sft.optimizer.k": "5",
    })
    spec = script.run()
    for key, times in [("name", 2), ("size", 2), ("positional_encoding", 2), ("d_model", 3), ("n_heads", 2),
                       ("stages", 3), ("pretrain.optimizer", 2), ("pretrain.optimizer.ns_steps", 3),
                       ("pretrain.optimizer.ns_dtype", 2), ("pretrain.lr", 3), ("pretrain.batch_sequences", 2)]:
        assert script.asked.count(key) == times, key
    errors = "\n".join(script.said)
    assert "unknown choice 'huge'" in errors and "did you mean rope" in errors
    assert "'abc' is not a number" in errors and "divisible by n_heads (5)" in errors
    assert "unknown stage(s) rlhf" in errors and "include pretrain" in errors
    assert "n_kv_heads" not in script.asked  # only gqa asks it
    path = tmp_path / "p.yaml"
    write_spec(spec, path)
    pipeline = load_spec(path)
    assert list(pipeline.stages) == ["pretrain", "sft", "merge", "eval"]
    assert pipeline.stages["sft"].lora is not None  # merge needs adapters
    assert pipeline.model.d_model == 96 and pipeline.model.n_heads == 3 and pipeline.model.num_kv_heads == 3
    assert pipeline.model.positional_encoding == "alibi"
    assert pipeline.tokenizer.train.vocab_size == PRESETS["small"][6]
    opt = pipeline.stages["pretrain"].train.optimizer
    assert (opt.name, opt.ns_steps, opt.ns_dtype) == ("muon", 3, "fp32")
    assert pipeline.stages["sft"].train.optimizer.name == "sophia" and pipeline.stages["sft"].train.optimizer.k == 5


def test_shown_parameter_count_matches_count_parameters():
    script = Script({"size": "small", "activation": "gelu", "stages": "pretrain,dpo", "dpo.batch_pairs": "48"})
    spec = script.run()
    config = LlmlabConfig(**spec["model"], vocab_size=spec["tokenizer"]["train"]["vocab_size"])
    shown = next(line for line in script.said if line.startswith("parameters:"))
    assert int(re.sub(r"\D", "", shown)) == count_parameters(config)
    assert spec["model"]["d_ff"] == 4 * spec["model"]["d_model"]  # gelu: the 4x default
    _, memory = estimates(spec)
    assert set(memory) == {"pretrain", "dpo"}
    assert any(line.strip().startswith("dpo") and "memory" in line for line in script.said)
    assert spec["stages"]["dpo"]["train"]["batch_pairs"] == 48


def test_presets_are_roughly_their_size():
    for size, target in [("tiny", 1e6), ("small", 10e6), ("base", 100e6)]:
        params, _ = estimates(Script({"size": size}).run())
        assert 0.7 * target < params < 1.3 * target, (size, params)


def test_write_spec_refuses_invalid_and_existing(tmp_path):
    spec = Script().run(defaults=True)
    path = tmp_path / "p.yaml"
    write_spec(spec, path)
    with pytest.raises(FileExistsError):
        write_spec(spec, path)
    bad = yaml.safe_load(yaml.safe_dump(spec))
    bad["stages"]["pretrain"]["train"]["warmup_steps"] = 10_000
    with pytest.raises(SpecError):
        write_spec(bad, tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()
