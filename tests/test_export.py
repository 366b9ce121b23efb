"""Exporting models: hf round trip, stock-Llama export with equal logits, and the refusals."""

import json
import random

import pytest
import torch

from llmlab.export import ExportError, export_model, llama_blockers
from llmlab.model import LlmlabConfig, build_model
from llmlab.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["user", "assistant", "sort", "max", "abc"]) for _ in range(6))
             + f" {rng.randrange(1000)}" for _ in range(100)]
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(texts, vocab_size=300, out_dir=out)
    return out


def save_model(root, tok_dir, **overrides):
    """A randomly initialised model saved with its tokenizer; norms and biases randomised so a
    wrong mapping shows in the logits."""
    tok = load_tokenizer(str(tok_dir))
    kwargs = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "vocab_size": len(tok),
                  "max_seq_len": 64, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id}
    kwargs.update(overrides)
    model = build_model(LlmlabConfig(**kwargs), seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in n else 0.0))
    model.eval()
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def logits_of(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def tokens(model):
    return torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))


def assert_tokenizer_travelled(out, tok_dir):
    assert (out / "chat_template.jinja").is_file()
    assert (out / "tokenizer.json").is_file()
    tok = load_tokenizer(str(out))
    assert "{% generation %}" in tok.chat_template
    assert tok.get_vocab() == load_tokenizer(str(tok_dir)).get_vocab()


def test_hf_export_round_trips(tmp_path, tok_dir):
    from transformers import AutoModelForCausalLM

    import llmlab.model  # noqa: F401

    src, model = save_model(tmp_path, tok_dir, positional_encoding="alibi", norm_type="layernorm",
                            activation="gelu")
    out = export_model(src, tmp_path / "hf", "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llmlab"
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LlmlabForCausalLM"
    x = tokens(model)
    assert torch.equal(logits_of(loaded, x), logits_of(model, x))
    assert_tokenizer_travelled(out, tok_dir)


@pytest.mark.parametrize("overrides", [
    {"attention_type": "mha", "tie_word_embeddings": True},
    {"attention_type": "gqa", "tie_word_embeddings": False},
    {"attention_type": "mqa", "tie_word_embeddings": True},
    {"attention_type": "mqa", "tie_word_embeddings": False, "attention_bias": True, "rope_theta": 500.0},
    {"attention_type": "gqa", "positional_encoding": "yarn", "yarn_scale": 4.0, "max_seq_len": 256},
], ids=["mha-tied", "gqa-untied", "mqa-tied", "mqa-untied-bias", "gqa-yarn"])
def test_llama_export_loads_with_stock_transformers_and_matches(tmp_path, tok_dir, overrides):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    src, model = save_model(tmp_path, tok_dir, **overrides)
    assert llama_blockers(model.config) == []
    out = export_model(src, tmp_path / "llama", "llama")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config
    x = tokens(model) if "yarn" not in overrides.values() else torch.randint(
        0, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    ours = logits_of(model, x)
    for cls in (LlamaForCausalLM, AutoModelForCausalLM):
        llama = cls.from_pretrained(str(out), dtype=torch.float32).eval()
        assert type(llama) is LlamaForCausalLM
        assert llama.config.num_key_value_heads == model.config.num_kv_heads
        assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == model.config.tie_word_embeddings
        assert (logits_of(llama, x) - ours).abs().max().item() <= 1e-4
    assert_tokenizer_travelled(out, tok_dir)


def test_llama_export_refusal_lists_every_blocking_option(tmp_path, tok_dir):
    src, model = save_model(tmp_path, tok_dir, positional_encoding="alibi", norm_type="layernorm",
                            activation="gelu", sliding_window=16)
    blockers = llama_blockers(model.config)
    assert len(blockers) == 4
    with pytest.raises(ExportError) as e:
        export_model(src, tmp_path / "llama", "llama")
    msg = str(e.value)
    for needle in (str(src), "positional_encoding is alibi", "norm_type is layernorm", "activation is gelu",
                   "sliding_window is 16", "--format hf"):
        assert needle in msg
    assert not (tmp_path / "llama").exists()


@pytest.mark.parametrize("overrides, needle", [
    ({"positional_encoding": "sinusoidal"}, "positional_encoding is sinusoidal"),
    ({"activation": "silu"}, "activation is silu"),
])
def test_each_blocker_alone(overrides, needle):
    blockers = llama_blockers(LlmlabConfig(**overrides))
    assert len(blockers) == 1 and needle in blockers[0]


def test_export_errors_name_the_folder_and_the_fix(tmp_path, tok_dir):
    with pytest.raises(ExportError, match="Model folder not found"):
        export_model(tmp_path / "nope", tmp_path / "out", "hf")
    src, _ = save_model(tmp_path, tok_dir)
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(src, tmp_path / "out", "gguf")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (src / f).unlink(missing_ok=True)
    with pytest.raises(ExportError, match="--tokenizer"):
        export_model(src, tmp_path / "out", "hf")
    out = export_model(src, tmp_path / "out", "hf", tokenizer=tok_dir)
    assert_tokenizer_travelled(out, tok_dir)


def test_cli_export_refuses_non_llama_architectures_with_the_reasons(tmp_path):
    import subprocess
    import sys

    from llmlab.model import LlmlabConfig, build_model
    from llmlab.tokenizer import train_tokenizer

    d = tmp_path / "m"
    tok = train_tokenizer(["some text 123"] * 50, 280, d)
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, vocab_size=len(tok), max_seq_len=32,
                       positional_encoding="alibi", norm_type="layernorm")
    build_model(cfg, seed=0).save_pretrained(d)
    out = subprocess.run([sys.executable, "-m", "llmlab.cli", "export", str(d), str(tmp_path / "x"), "--format", "llama"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "alibi" in out.stderr and "layernorm" in out.stderr and "--format hf" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "llmlab.cli", "export", str(d), str(tmp_path / "y")], capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "y" / "chat_template.jinja").is_file()
