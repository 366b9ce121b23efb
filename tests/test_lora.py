"""LoRA presets, adapter-only training, and adapters that reload with peft."""

import pytest
import torch

from llmlab.lora import (PRESETS, LoraTargetError, apply_lora, load_adapters, resolve_targets, save_adapters,
                         trainable_share)
from llmlab.model import LlmlabConfig, build_model


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def tiny(activation="swiglu"):
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=300,
                       max_seq_len=64, activation=activation)
    return build_model(cfg, seed=0)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu", "silu", "leaky_relu"])
def test_presets_name_modules_that_exist(activation):
    gated = activation == "swiglu"
    ffn = ["gate_proj", "up_proj", "down_proj"] if gated else ["up_proj", "down_proj"]
    expected = {
        "minimal": ["q_proj", "v_proj"],
        "attention_only": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "ffn_only": ffn,
        "all": ["q_proj", "k_proj", "v_proj", "o_proj", *ffn],
    }
    model = tiny(activation)
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for preset, names in expected.items():
        assert resolve_targets(model, preset) == names
        assert set(names) <= leaves
    assert resolve_targets(model, "custom", ["o_proj"]) == ["o_proj"]
    assert set(PRESETS) == {*expected, "custom"}


def stock(family):
    import transformers as tf

    llama_like = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      num_hidden_layers=2, vocab_size=300)
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=300)),
        "neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, num_attention_heads=4,
                                                                intermediate_size=64, num_hidden_layers=2, vocab_size=300)),
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                      num_hidden_layers=2, vocab_size=300)),
    }[family]()


ROLES = {  # family -> preset -> the module names peft is given
    "llama": {"minimal": ["q_proj", "v_proj"], "attention_only": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "ffn_only": ["gate_proj", "up_proj", "down_proj"]},
    "qwen2": {"minimal": ["q_proj", "v_proj"], "attention_only": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "ffn_only": ["gate_proj", "up_proj", "down_proj"]},
    # GPT-2: a fused qkv projection, and c_proj in both blocks (named with its block)
    "gpt2": {"minimal": ["c_attn"], "attention_only": ["c_attn", "attn.c_proj"], "ffn_only": ["c_fc", "mlp.c_proj"]},
    "neox": {"minimal": ["query_key_value"], "attention_only": ["query_key_value", "dense"],
             "ffn_only": ["dense_h_to_4h", "dense_4h_to_h"]},
    "phi": {"minimal": ["q_proj", "v_proj"], "attention_only": ["q_proj", "k_proj", "v_proj", "dense"],
            "ffn_only": ["fc1", "fc2"]},
}


@pytest.mark.parametrize("family", list(ROLES))
def test_presets_resolve_by_role_in_each_family_and_train_only_those_modules(family):
    model = stock(family)
    for preset, names in ROLES[family].items():
        assert resolve_targets(model, preset) == names, preset
    targets = resolve_targets(model, "all")
    assert targets == ROLES[family]["attention_only"] + ROLES[family]["ffn_only"]
    wrapped = apply_lora(model, 4, 8, 0.0, targets)
    adapted = {n.split(".lora_")[0] for n, p in wrapped.named_parameters() if p.requires_grad}
    linears = [n for n, m in wrapped.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and "lora_" not in n
               and not n.endswith(("base_layer", "lm_head"))]
    # every projection of both blocks got an adapter, and nothing else did
    assert adapted == {n for n in linears if "lora" not in n and n.rsplit(".", 2)[-2] in ("attn", "attention", "self_attn", "mlp")}
    out = wrapped(input_ids=torch.randint(0, 300, (2, 6)))
    assert out.logits.shape == (2, 6, 300)


def test_preset_errors():
    with pytest.raises(ValueError, match="needs `target_modules`"):
        resolve_targets(tiny(), "custom")
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        resolve_targets(tiny(), "everything")
    with pytest.raises(ValueError, match="only used with preset 'custom'"):
        resolve_targets(tiny(), "minimal", ["q_proj"])
    # a custom name the model does not have is listed with what it has
    with pytest.raises(LoraTargetError, match=r"\['gate_proj'\] match no linear module.*mlp.up_proj"):
        resolve_targets(tiny("gelu"), "custom", ["gate_proj"])
    with pytest.raises(LoraTargetError, match=r"found no ffn_only projection.*attn.c_attn"):
        resolve_targets(_attention_only(), "ffn_only")


def _attention_only():
    """A model with an attention block and no feed-forward block."""

    class AttnOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"c_attn": torch.nn.Linear(4, 12)})})

    return AttnOnly()


def test_special_token_rows_outside_the_embeddings_are_refused():
    with pytest.raises(ValueError, match=r"token ids \[300\] are outside the model's 300 embedding rows"):
        apply_lora(tiny(), 4, 8, 0.0, ["q_proj"], trainable_token_ids=[1, 300])


def test_only_lora_parameters_change_during_training():
    model = apply_lora(tiny(), r=4, alpha=8, dropout=0.0, targets=resolve_targets(tiny(), "all"))
    trainable, total = trainable_share(model)
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    # r=4 on 2 layers: q,o (32x32), k,v (32x16), gate/up (32->64), down (64->32): r*(in+out) each
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert trainable == 2 * per_layer and 0 < trainable / total < 0.5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    x = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in lora if "lora_B" in n or "lora_A" in n}
    assert any("lora_B" in n for n in changed)


def test_adapters_reload_with_peft_to_identical_logits(tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny().save_pretrained(base_dir)
    model = apply_lora(tiny(), r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    out = save_adapters(model, tmp_path / "adapters" / "best", base_model=base_dir)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=x).logits
        reloaded = PeftModel.from_pretrained(tiny(), str(out)).eval()
        assert torch.equal(reloaded(input_ids=x).logits, want)
        via_helper = load_adapters(base_dir, out).eval()
        assert torch.equal(via_helper(input_ids=x).logits, want)
        assert not torch.equal(tiny()(input_ids=x).logits, want)  # the adapters do something


def test_trainable_special_tokens_change_only_their_rows_and_survive_merge(tmp_path):
    from llmlab.merge import merge_adapters

    base = tiny()
    base.save_pretrained(tmp_path / "base")
    special = [0, 3, 4]
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"], trainable_token_ids=special)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.tensor([[0, 3, 10, 11, 4, 12, 13, 4]])
    for _ in range(5):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens" in n for n in names) and any("lora_" in n for n in names)
    save_adapters(model, tmp_path / "adapters", base_model=tmp_path / "base")
    merged_dir = merge_adapters(tmp_path / "adapters", None, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        want = model(input_ids=x).logits
        got = merged(input_ids=x).logits
    assert (want - got).abs().max() < 1e-5
    w_base = tiny().get_input_embeddings().weight
    w_merged = merged.get_input_embeddings().weight
    changed = (w_merged - w_base).abs().sum(-1) > 0
    assert sorted(torch.nonzero(changed).flatten().tolist()) == special
