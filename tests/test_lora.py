"""LoRA presets, adapter-only training, and adapters that reload with peft."""

import pytest
import torch

from llmlab.lora import (PRESETS, apply_lora, load_adapters, save_adapters, target_modules,
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
        assert target_modules(preset, activation) == names
        assert set(names) <= leaves
    assert target_modules("custom", activation, ["o_proj"]) == ["o_proj"]
    assert set(PRESETS) == {*expected, "custom"}


def test_preset_errors():
    with pytest.raises(ValueError, match="needs `target_modules`"):
        target_modules("custom", "swiglu")
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        target_modules("everything", "swiglu")
    with pytest.raises(ValueError, match="only used with preset 'custom'"):
        target_modules("minimal", "swiglu", ["q_proj"])
    with pytest.raises(ValueError, match="gate_proj"):
        apply_lora(tiny("gelu"), 4, 8, 0.0, ["gate_proj"])


def test_only_lora_parameters_change_during_training():
    model = apply_lora(tiny(), r=4, alpha=8, dropout=0.0, targets=target_modules("all", "swiglu"))
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
