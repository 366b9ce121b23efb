"""Tests of the llmlab model: every architecture variant trains, KV-cached decoding equals the full
forward, padding / packing / sliding window masks behave, checkpoints round-trip exactly, and the
positional and counting helpers match their papers / the real model. Tiny models, CPU only."""

from __future__ import annotations

import itertools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
from transformers import DynamicCache
from transformers import AutoConfig, AutoModelForCausalLM

from llmlab.model import (
    LlmlabConfig,
    LlmlabForCausalLM,
    build_model,
    count_parameters,
    estimate_training_memory,
)
from llmlab.model.positions import alibi_slopes, rope_inv_freq, yarn_inv_freq

VOCAB = 64
POSITIONAL = ["sinusoidal", "rope", "alibi", "yarn"]
ATTENTION = ["mha", "mqa", "gqa"]
NORMS = ["layernorm", "rmsnorm"]
ACTIVATIONS = ["relu", "gelu", "silu", "leaky_relu", "swiglu"]
ALL_COMBOS = list(itertools.product(POSITIONAL, ATTENTION, NORMS, ACTIVATIONS))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread, and OpenMP threads spinning against another job on a
    2-core machine slowed this file twenty-fold; restore the setting for other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> LlmlabConfig:
    fields = dict(d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, n_layers=2, vocab_size=VOCAB,
                  max_seq_len=32, yarn_scale=2.0, pad_token_id=0)
    fields.update(overrides)
    return LlmlabConfig(**fields)


def combo_config(pe, attn, norm, act, **overrides) -> LlmlabConfig:
    return tiny_config(positional_encoding=pe, attention_type=attn, norm_type=norm, activation=act, **overrides)


def tokens(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, shape, generator=g)


@pytest.mark.parametrize("pe,attn,norm,act", ALL_COMBOS)
def test_forward_backward_every_architecture(pe, attn, norm, act):
    model = build_model(combo_config(pe, attn, norm, act, attention_bias=True), seed=0)
    ids = tokens(2, 12)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, VOCAB)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def _incremental_logits(model, ids, attention_mask=None, chunks=(6, 1, 1, 1, 1, 1, 1)) -> torch.Tensor:
    """Prefill, then single tokens, then the rest as one chunk; returns the concatenated logits."""
    cache, outs, start = DynamicCache(), [], 0
    for size in [*chunks, ids.shape[1] - sum(chunks)]:
        end = start + size
        mask = attention_mask[:, :end] if attention_mask is not None else None
        out = model(ids[:, start:end], attention_mask=mask, cache=cache)
        assert out.cache is cache and cache.get_seq_length() == end
        outs.append(out.logits)
        start = end
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("pe,attn,norm,act", ALL_COMBOS)
def test_kv_cache_equals_full_forward(pe, attn, norm, act, window):
    """Also exercises positions past the window (T=16 > 5) and left padding in row 1."""
    model = build_model(combo_config(pe, attn, norm, act, sliding_window=window), seed=1).eval()
    ids = tokens(2, 16, seed=2)
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(_incremental_logits(model, ids), full, atol=1e-5, rtol=0)

        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        ids = ids.masked_fill(mask == 0, 0)
        full = model(ids, attention_mask=mask).logits
        cached = _incremental_logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("pe", POSITIONAL)
def test_left_padded_batch_equals_single_sequences(pe, window):
    model = build_model(tiny_config(positional_encoding=pe, sliding_window=window), seed=3).eval()
    lengths, T = [10, 7, 4], 10
    seqs = [tokens(1, n, seed=10 + n) for n in lengths]
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, T - s.shape[1]:] = s[0]
        mask[i, T - s.shape[1]:] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(s).logits[0]
            torch.testing.assert_close(batched[i, T - s.shape[1]:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("pe", POSITIONAL)
def test_packed_segments_do_not_leak(pe, attn, window):
    config = tiny_config(positional_encoding=pe, attention_type=attn, sliding_window=window, initializer_range=0.3)
    model = build_model(config, seed=4).eval()
    a, b = tokens(1, 7, seed=5), tokens(1, 9, seed=6)
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = model(packed, segment_ids=segments).logits
        torch.testing.assert_close(out[:, :7], model(a).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:], model(b).logits, atol=1e-5, rtol=0)
        # Without segment ids the second example sees the first: the test can tell the difference.
        assert not torch.allclose(model(packed).logits[:, 7:], model(b).logits, atol=1e-4)


@pytest.mark.parametrize("pe", POSITIONAL)
def test_sliding_window_hides_tokens_outside_the_window(pe):
    window, n_layers, T, query = 4, 2, 14, 13
    # A large init makes every token's influence clearly visible in the logits.
    config = tiny_config(positional_encoding=pe, sliding_window=window, n_layers=n_layers, initializer_range=0.3)
    model = build_model(config, seed=7).eval()
    ids = tokens(1, T, seed=8)
    # Stacked layers widen the receptive field to n_layers * (window - 1) tokens back.
    outside = query - n_layers * (window - 1) - 1
    inside = query - 1
    with torch.no_grad():
        base = model(ids).logits[0, query]
        far, near = ids.clone(), ids.clone()
        far[0, outside] = (far[0, outside] % (VOCAB - 1)) + 1
        near[0, inside] = (near[0, inside] % (VOCAB - 1)) + 1
        assert far[0, outside] != ids[0, outside] and near[0, inside] != ids[0, inside]
        torch.testing.assert_close(model(far).logits[0, query], base, atol=1e-6, rtol=0)
        assert not torch.allclose(model(near).logits[0, query], base, atol=1e-4)
        # Without a window the far token does matter.
        config.sliding_window = None
        full = build_model(config, seed=7).eval()
        assert not torch.allclose(full(far).logits[0, query], full(ids).logits[0, query], atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pe", ["rope", "yarn", "alibi", "sinusoidal"])
def test_save_load_round_trip(tmp_path, pe, tied):
    model = build_model(tiny_config(positional_encoding=pe, tie_word_embeddings=tied), seed=9).eval()
    if not tied:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LlmlabConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LlmlabForCausalLM)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids = tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_yarn_with_scale_one_equals_rope():
    inv, mscale = yarn_inv_freq(16, 10000.0, 1.0, 64)
    assert mscale == 1.0
    torch.testing.assert_close(inv, rope_inv_freq(16, 10000.0), atol=0, rtol=0)
    rope = build_model(tiny_config(positional_encoding="rope"), seed=11).eval()
    yarn = build_model(tiny_config(positional_encoding="yarn", yarn_scale=1.0), seed=11).eval()
    ids = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(yarn(ids).logits, rope(ids).logits, atol=0, rtol=0)


def test_yarn_interpolates_low_frequencies_only():
    head_dim, theta, scale, original = 64, 10000.0, 4.0, 2048
    inv, mscale = yarn_inv_freq(head_dim, theta, scale, original)
    rope = rope_inv_freq(head_dim, theta)
    assert mscale == pytest.approx(0.1 * math.log(scale) + 1.0)
    wavelength_turns = original * rope / (2 * math.pi)  # rotations over the original context
    fast, slow = wavelength_turns > 32, wavelength_turns < 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(inv[fast], rope[fast], atol=0, rtol=0)
    torch.testing.assert_close(inv[slow], rope[slow] / scale, atol=0, rtol=1e-6)
    ramp = ~fast & ~slow
    assert ((inv[ramp] <= rope[ramp]) & (inv[ramp] >= rope[ramp] / scale)).all()


def test_yarn_matches_transformers_reference():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref_config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 128})
    ref_inv, ref_mscale = ROPE_INIT_FUNCTIONS["yarn"](ref_config, "cpu")
    inv, mscale = yarn_inv_freq(64, 10000.0, 4.0, 128)
    torch.testing.assert_close(inv, ref_inv.float(), atol=0, rtol=1e-6)
    assert mscale == pytest.approx(ref_mscale)


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    # Non power of two (6 heads): slopes of 4 heads, then every other slope of 8 heads.
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected))


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False},
    {"attention_type": "mha", "norm_type": "layernorm", "activation": "gelu", "attention_bias": True},
    {"attention_type": "mqa", "activation": "relu", "positional_encoding": "alibi", "n_layers": 3},
    {"d_model": 48, "n_heads": 6, "n_kv_heads": 3, "d_ff": 100, "vocab_size": 100},
])
def test_count_parameters_analytic_equals_actual(overrides):
    config = tiny_config(**overrides)
    assert count_parameters(config) == count_parameters(build_model(config))


def test_training_memory_estimate():
    config = tiny_config()
    est = estimate_training_memory(config, batch_size=4, seq_len=16)
    params = count_parameters(config)
    assert est["params"] == params
    assert est["weights_bytes"] == est["grads_bytes"] == 4 * params and est["optimizer_bytes"] == 8 * params
    parts = ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes")
    assert est["total_bytes"] == sum(est[k] for k in parts)
    bigger = estimate_training_memory(config, batch_size=8, seq_len=16)
    assert bigger["activations_bytes"] == 2 * est["activations_bytes"]


def test_loss_ignores_minus_100_and_shifts():
    model = build_model(tiny_config(), seed=12)
    ids = tokens(2, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits, targets = out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


def test_init_scales_residual_projections_and_seed_is_reproducible():
    config = tiny_config(d_model=128, d_ff=256, n_layers=8)
    model = build_model(config, seed=0)
    layer = model.model.layers[0]
    std = config.initializer_range
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.1)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.1)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))
    again = build_model(config, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    other = build_model(config, seed=1)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_config_validation_and_kv_heads():
    assert tiny_config(attention_type="mha").num_kv_heads == 4
    assert tiny_config(attention_type="mqa").num_kv_heads == 1
    assert tiny_config(attention_type="gqa", n_kv_heads=2).num_kv_heads == 2
    with pytest.raises(ValueError):
        tiny_config(positional_encoding="learned")
    with pytest.raises(ValueError):
        tiny_config(n_heads=5)


def test_peft_lora_wraps_the_model():
    from peft import LoraConfig, get_peft_model

    model = build_model(tiny_config(), seed=13).eval()
    ids = tokens(2, 8)
    with torch.no_grad():
        base = model(ids).logits
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA's B starts at zero: the wrapped model is the base model
        torch.testing.assert_close(lora(input_ids=ids).logits, base, atol=1e-6, rtol=0)
    lora(input_ids=ids, labels=ids).loss.backward()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = tokens(2, 12, seed=4)
    plain = build_model(combo_config("rope", "gqa", "rmsnorm", "swiglu"), seed=5).train()
    saved = build_model(combo_config("rope", "gqa", "rmsnorm", "swiglu"), seed=5).train()
    saved.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert saved.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    calls = {}
    for label, m in (("plain", plain), ("saved", saved)):
        calls[label] = 0
        block = m.model.layers[0]

        def counted(*args, forward=block.forward, label=label):
            calls[label] += 1
            return forward(*args)

        block.forward = counted
        m(ids, labels=ids).loss.backward()
    assert calls == {"plain": 1, "saved": 2}  # the checkpointed block ran again in the backward pass
    for (name, a), (_, b) in zip(plain.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)
