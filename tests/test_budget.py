"""Budgets and the analytic cost model the criteria share."""

import pytest

from vitsparse.errors import PlanError
from vitsparse.pruning.budget import Budget, FlopsCost


def test_parse():
    assert Budget.parse("flops=0.5") == Budget("flops", 0.5)
    assert Budget.parse(" params = 0.25 ").to_json() == {"params": 0.25}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("flops:0.5", "not METRIC=FRACTION"),
        ("latency=0.5", "not METRIC=FRACTION"),
        ("flops=1.5", r"flops=1.5 is not a kept fraction in \(0, 1\]"),
        ("flops=0", "is not a kept fraction"),
        ("flops=abc", "not METRIC=FRACTION"),
    ],
)
def test_bad_budgets(text, message):
    with pytest.raises(PlanError, match=message):
        Budget.parse(text)


def test_flops_cost_is_the_multiply_adds_saved():
    assert FlopsCost().saving("blocks.0.mlp.fc1", (1536, 384), 197, 0.5) == 197 * 1536 * 384 / 2
