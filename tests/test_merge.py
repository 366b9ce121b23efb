"""Merging LoRA adapters: plain model, same logits, tokenizer kept, and the troubleshooting errors."""

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmlab.lora import apply_lora, resolve_targets, save_adapters
from llmlab.merge import MergeError, merge_adapters, merge_stage_output
from llmlab.model import LlmlabConfig, build_model
from llmlab.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def texts():
    rng = random.Random(0)
    return [" ".join(rng.choice(["user", "assistant", "rev", "sort", "max"]) for _ in range(5))
            + f" {rng.randrange(1000)}+1= " + " ".join(rng.choice("abcdefghij") for _ in range(4))
            for _ in range(200)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base model folder, a tokenizer, and an SFT-like stage output with LoRA adapters that do
    something (lora_B randomised)."""
    root = tmp_path_factory.mktemp("merge")
    tok = train_tokenizer(texts(), vocab_size=300, out_dir=root / "tok")
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok),
                       max_seq_len=64)
    base_dir = root / "base"
    build_model(cfg, seed=0).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    base = build_model(cfg, seed=0)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, targets=resolve_targets(base, "all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    model.eval()
    stage = root / "sft"
    save_adapters(model, stage / "adapters" / "best", base_model=base_dir, tokenizer=tok)
    save_adapters(model, stage / "adapters" / "final", base_model=base_dir, tokenizer=tok)
    return {"root": root, "base": base_dir, "stage": stage, "model": model, "cfg": cfg}


def logits_of(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_merged_model_equals_unmerged_and_is_plain(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge_adapters(trained["stage"] / "adapters" / "best", trained["base"], tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(merged).__name__ == "LlmlabForCausalLM"
    x = torch.randint(0, trained["cfg"].vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    diff = (logits_of(merged, x) - logits_of(trained["model"], x)).abs().max().item()
    assert diff <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(str(trained["base"]), dtype=torch.float32).eval()
    assert (logits_of(base, x) - logits_of(merged, x)).abs().max().item() > 1e-3
    # The tokenizer and its chat template come along.
    assert (out / "chat_template.jinja").is_file()
    tok = load_tokenizer(str(out))
    assert "{% generation %}" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") == load_tokenizer(str(trained["base"])).convert_tokens_to_ids("<|im_end|>")


def test_merge_stage_output_reads_the_base_from_the_adapter_config(trained, tmp_path):
    cfg = json.loads((trained["stage"] / "adapters" / "best" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(trained["base"].resolve())
    out = merge_stage_output(trained["stage"], tmp_path / "m2")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.randint(0, trained["cfg"].vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    assert (logits_of(merged, x) - logits_of(trained["model"], x)).abs().max().item() <= 1e-5


def test_adapter_folder_not_found(tmp_path):
    missing = tmp_path / "nope" / "adapters"
    with pytest.raises(MergeError, match="Adapter folder not found") as e:
        merge_adapters(missing, None, tmp_path / "out")
    assert str(missing) in str(e.value) and "adapter_config.json" in str(e.value)
    empty_stage = tmp_path / "stage"
    empty_stage.mkdir()
    with pytest.raises(MergeError, match="Adapter folder not found") as e:
        merge_stage_output(empty_stage, tmp_path / "out")
    assert str(empty_stage) in str(e.value) and "lora" in str(e.value).lower()
    assert not (tmp_path / "out").exists()


def test_could_not_load_lora_config(trained, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    with pytest.raises(MergeError, match="Could not load LoRA config") as e:
        merge_adapters(folder, trained["base"], tmp_path / "out")
    assert str(folder / "adapter_config.json") in str(e.value) and "re-run" in str(e.value)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(MergeError, match="Could not load LoRA config"):
        merge_adapters(folder, trained["base"], tmp_path / "out")


def test_checkpoint_without_lora_parameters(trained, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    good = trained["stage"] / "adapters" / "best" / "adapter_config.json"
    (folder / "adapter_config.json").write_text(good.read_text())
    with pytest.raises(MergeError, match="Checkpoint doesn't have LoRA parameters") as e:
        merge_adapters(folder, trained["base"], tmp_path / "out")
    assert str(folder) in str(e.value)
    # A full model's weights where the adapters should be.
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="Checkpoint doesn't have LoRA parameters") as e:
        merge_adapters(folder, trained["base"], tmp_path / "out")
    assert "adapter_model.safetensors" in str(e.value) and "full model" in str(e.value)


def test_merging_into_a_stock_qwen2_keeps_the_family_and_the_logits(tmp_path):
    """A stock Qwen2 with LoRA adapters (and a tokenizer that grew by one token in training) merges
    into a plain Qwen2ForCausalLM whose logits equal the adapted model's."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from llmlab.lora import load_adapters
    from llmlab.merge import merge_adapters
    from llmlab.models import fit_embeddings
    from llmlab.tokenizer import load_tokenizer

    tok = train_tokenizer([f"{i} plus {i} is {2 * i}" for i in range(200)], 300, tmp_path / "tok")
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        num_hidden_layers=2, vocab_size=len(tok)))
    base.save_pretrained(tmp_path / "base")
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]}, replace_extra_special_tokens=False)
    fit_embeddings(base, tok)  # one more row, trained through trainable tokens below
    model = apply_lora(base, 4, 8, 0.0, resolve_targets(base, "all"), trainable_token_ids=[len(tok) - 1])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "trainable_tokens" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    save_adapters(model, tmp_path / "adapters", base_model=tmp_path / "base", tokenizer=tok)
    merged_dir = merge_adapters(tmp_path / "adapters", None, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    adapted = load_adapters(tmp_path / "base", tmp_path / "adapters", tokenizer=load_tokenizer(str(tmp_path / "adapters")))
    x = torch.randint(0, len(tok), (2, 9))
    x[0, 3] = len(tok) - 1  # the added token
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted.eval()(input_ids=x).logits, atol=1e-5, rtol=0)
