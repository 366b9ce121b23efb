"""Eval gates: parsing, numeric / previous / metric bounds, and the messages users see."""

from pathlib import Path

import pytest
import yaml

from llmlab.gates import check_gates, parse_gate
from llmlab.spec import SpecError, parse_spec


def test_gates_hold_or_fail_with_value_and_bound():
    metrics = {"eval/ppl": 120.0, "exact_match": 0.3, "dpo/exact_match": 0.34, "merge/exact_match": 0.28}
    assert check_gates(["eval/ppl < 200", "exact_match >= previous", "dpo/exact_match >= merge/exact_match"],
                       metrics, {"exact_match": 0.25}) == []
    (fail,) = check_gates(["eval/ppl < 40"], metrics, None)
    assert "eval/ppl = 120" in fail and "bound < 40" in fail
    (fail,) = check_gates(["exact_match >= previous"], metrics, {"exact_match": 0.5})
    assert "previous = 0.5" in fail
    (fail,) = check_gates(["merge/exact_match > dpo/exact_match"], metrics, None)
    assert "dpo/exact_match = 0.34" in fail
    (fail,) = check_gates(["eval/acc > 0.5"], metrics, None)
    assert "reported no metric 'eval/acc'" in fail and "eval/ppl" in fail


def test_bad_gate_syntax_is_a_spec_error_with_its_path():
    with pytest.raises(ValueError, match="METRIC OP BOUND"):
        parse_gate("ppl is low")
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines/tiny.yaml").read_text())
    spec["stages"]["pretrain"]["gates"] = ["eval/ppl < 400", "ppl is low"]
    with pytest.raises(SpecError) as err:
        parse_spec(yaml.safe_dump(spec, sort_keys=False))
    (issue,) = err.value.issues
    assert issue.path == "stages.pretrain.gates[1]"
