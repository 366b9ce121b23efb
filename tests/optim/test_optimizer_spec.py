"""The optimizer block of the spec: each optimizer's fields and seed defaults, per-optimizer
validation, and the message for a field that belongs to another optimizer."""

import textwrap

import pytest

from llmlab.spec import OPTIMIZER_NAMES, SpecError, TrainSpec, parse_spec

BASE = """
name: t
tokenizer: {train: {vocab_size: 512, data: [{path: builtin:stdlib}]}}
stages:
  a: {kind: pretrain, data: [{path: builtin:stdlib}], train: {max_steps: 10, warmup_steps: 1, optimizer: %s}}
  b: {kind: pretrain, from: a, data: [{path: builtin:stdlib}], train: {max_steps: 10, warmup_steps: 1, optimizer: %s}}
"""


def issues_of(a, b="{name: adamw}"):
    with pytest.raises(SpecError) as err:
        parse_spec(textwrap.dedent(BASE % (a, b)), "x.yaml")
    return {i.path: i.message for i in err.value.issues}


def test_seed_defaults():
    opt = {name: TrainSpec(optimizer={"name": name}).optimizer for name in OPTIMIZER_NAMES}
    assert set(OPTIMIZER_NAMES) == {"adamw", "adafactor", "lion", "sophia", "muon", "sgd"}
    assert (opt["adamw"].beta1, opt["adamw"].beta2, opt["adamw"].eps) == (0.9, 0.999, 1e-8)
    assert (opt["lion"].beta1, opt["lion"].beta2) == (0.9, 0.99)
    assert (opt["sophia"].beta1, opt["sophia"].beta2, opt["sophia"].rho, opt["sophia"].k) == (0.965, 0.99, 0.04, 10)
    assert (opt["muon"].momentum, opt["muon"].nesterov, opt["muon"].adamw_lr_ratio) == (0.95, True, 0.1)
    assert (opt["sgd"].momentum, opt["sgd"].nesterov, opt["sgd"].dampening) == (0.9, False, 0.0)
    # torch.optim.Adafactor's own defaults
    assert (opt["adafactor"].beta2_decay, opt["adafactor"].eps1, opt["adafactor"].eps2, opt["adafactor"].d) == (-0.8, None, 1e-3, 1.0)
    assert TrainSpec().optimizer.name == "adamw"


def test_each_stage_picks_its_own_optimizer():
    spec = parse_spec(textwrap.dedent(BASE % ("{name: sophia, k: 5, rho: 0.05}", "{name: muon, nesterov: false}")))
    a, b = spec.stages["a"].train.optimizer, spec.stages["b"].train.optimizer
    assert (a.name, a.k, a.rho) == ("sophia", 5, 0.05)
    assert (b.name, b.nesterov) == ("muon", False)


def test_field_of_another_optimizer_names_its_owner():
    msgs = issues_of("{name: adamw, rho: 0.1}", "{name: lion, momentum: 0.9}")
    assert msgs["stages.a.train.optimizer.rho"] == "unknown key 'rho' for optimizer 'adamw' — 'rho' is a field of sophia"
    assert "'momentum' is a field of muon, sgd" in msgs["stages.b.train.optimizer.momentum"]
    assert "for optimizer 'lion'" in msgs["stages.b.train.optimizer.momentum"]


def test_shared_field_lists_every_owner_and_typos_still_get_suggestions():
    msgs = issues_of("{name: muon, beta1: 0.9}", "{name: sophia, rhoo: 0.1}")
    assert "'beta1' is a field of adamw, lion, sophia" in msgs["stages.a.train.optimizer.beta1"]
    assert "did you mean 'rho'" in msgs["stages.b.train.optimizer.rhoo"]


@pytest.mark.parametrize("opt, path, fragment", [
    ("{name: sophia, rho: 0}", "stages.a.train.optimizer.rho", "greater than 0"),
    ("{name: sophia, k: 0}", "stages.a.train.optimizer.k", "greater than or equal to 1"),
    ("{name: lion, beta2: 1.0}", "stages.a.train.optimizer.beta2", "less than 1"),
    ("{name: muon, ns_dtype: fp16}", "stages.a.train.optimizer.ns_dtype", "fp32"),
    ("{name: adafactor, beta2_decay: 0.5}", "stages.a.train.optimizer.beta2_decay", "less than or equal to 0"),
    ("{name: sgd, momentum: 0, nesterov: true}", "stages.a.train.optimizer.nesterov", "needs momentum > 0"),
    ("{name: rmsprop}", "stages.a.train.optimizer", "choose one of 'adamw', 'adafactor', 'lion', 'sophia', 'muon', 'sgd'"),
])
def test_values_are_validated_per_optimizer(opt, path, fragment):
    assert fragment in issues_of(opt)[path]
