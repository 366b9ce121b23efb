"""Every stage kind is one complete record (`llmlab.runners.kind.StageKind`) that agrees with the spec,
and the records are what the rest of llmlab asks."""

import subprocess
import sys
import typing

import pytest

from llmlab.runners.registry import KINDS, kind_of, resolved_config
from llmlab.spec import STAGE_CLASSES, TokenizerSpec, load_spec

from helpers import ROOT


def test_every_kind_of_the_spec_has_exactly_one_record():
    assert set(KINDS) == set(STAGE_CLASSES) | {"tokenizer"}
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind.config is (TokenizerSpec if name == "tokenizer" else STAGE_CLASSES[name])


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_record_is_complete(name):
    kind = KINDS[name]
    assert callable(kind.run) and kind.run.__module__ == f"llmlab.runners.{name}"
    assert kind.main_output and kind.summary
    fields = kind.config.model_fields
    for path, shape in kind.data:  # every data field it reads exists on its block
        head, _, rest = path.partition(".")
        assert head in fields, f"{name}: no field {head}"
        if rest:
            inner = [t for t in typing.get_args(fields[head].annotation) if hasattr(t, "model_fields")]
            assert any(rest in t.model_fields for t in inner), f"{name}: no field {path}"
        assert shape.name
    trains = "train" in fields and name != "tokenizer"
    assert kind.trains == trains, f"{name}: a block with `train` must give a memory estimate, and only then"
    if trains:
        assert kind.work is not None and kind.describe is not None, f"{name}: a training kind counts its work"
    if kind.policy:
        assert "model" in fields, f"{name}: a policy kind starts from a model: its block has `model:`"
    if kind.makes_model:
        assert kind.main_output in ("model", "output"), f"{name}: a model-making kind hands on a model or adapters"


def test_a_pipeline_asks_the_records(tmp_path):
    spec = load_spec(ROOT / "pipelines" / "tiny-ppo.yaml")
    assert [kind_of(spec, s).name for s in spec.stage_names()] == ["tokenizer"] + [spec.stages[s].kind for s in spec.stages]
    pretrain = resolved_config(spec, "pretrain")  # from scratch: the model and tokenizer are part of its config
    assert pretrain["model"]["d_model"] == spec.model.d_model and pretrain["seed"] == spec.seed
    assert "model" not in resolved_config(spec, "sft") or resolved_config(spec, "sft")["model"] is None
    assert resolved_config(spec, "tokenizer")["kind"] == "tokenizer"


def test_the_records_load_without_torch():
    code = "import sys; from llmlab.runners.registry import KINDS; print('torch' in sys.modules, len(KINDS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", str(len(KINDS))]
