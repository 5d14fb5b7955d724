"""The LPViT criterion: a valid plan that meets its FLOPs budget, deterministic, compiled equal to
PyTorch, the sign of the cost term, and bad input."""

import re

import pytest
import torch
from _compiled import assert_compiled_matches_torch

import vitsparse
from vitsparse.data.sources import load_images
from vitsparse.errors import DataError, PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.plan import validate_plan
from vitsparse.pruning.budget import Budget, FlopsCost
from vitsparse.pruning.lpvit import lpvit_plan


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    calib = load_images("synthetic", image_size=32, limit=32).images
    return model, calib


@pytest.mark.parametrize("fraction", [0.9, 0.6])
def test_plan_meets_its_budget_and_is_deterministic(setup, fraction):
    model, calib = setup
    plan = lpvit_plan(model, calib, Budget("flops", fraction), model_id="tiny")
    validate_plan(plan, model)
    kept = vitsparse.flops(model, plan).ratio(vitsparse.flops(model))
    assert kept <= fraction + 1e-9 and kept > fraction - 0.05
    assert len({round(m.density, 3) for m in plan.layers.values()}) > 1  # not uniform
    again = lpvit_plan(model, calib, Budget("flops", fraction), model_id="tiny")
    assert again == plan


def test_params_budget(setup):
    model, calib = setup
    plan = lpvit_plan(model, calib, Budget("params", 0.6), model_id="tiny")
    kept = vitsparse.params(model, plan) / vitsparse.params(model)
    assert 0.55 < kept <= 0.6


def test_compiled_lpvit_model_matches_pytorch(setup):
    model, calib = setup
    plan = lpvit_plan(model, calib, Budget("flops", 0.7), model_id="tiny")
    assert_compiled_matches_torch(model, plan)


class _Favour(FlopsCost):
    """FLOPs saving, multiplied for one layer."""

    def __init__(self, layer, factor):
        self.layer, self.factor = layer, factor

    def saving(self, layer, shape, tokens, sparsity):
        base = super().saving(layer, shape, tokens, sparsity)
        return base * (self.factor if layer == self.layer else 1.0)


def test_a_larger_saving_gets_at_least_as_much_sparsity(setup):
    # The sign of the cost term: the same layer, all else equal, with a larger saving per unit
    # of sparsity must not be pruned less (the published code's sign protects costly layers).
    model, calib = setup
    layer = "blocks.1.attn.proj"
    for fraction in (0.8, 0.6):
        plain = lpvit_plan(model, calib, Budget("flops", fraction), model_id="tiny")
        favoured = lpvit_plan(
            model, calib, Budget("flops", fraction), model_id="tiny", cost=_Favour(layer, 4.0)
        )
        assert favoured.layers[layer].density <= plain.layers[layer].density


@pytest.mark.parametrize(
    ("budget", "calib", "error", "message"),
    [
        (Budget("flops", 0.5), torch.zeros((0, 3, 32, 32)), DataError, "calibration set is empty"),
        (Budget("flops", 0.05), None, PlanError, "cannot be met by block pruning"),
    ],
)
def test_bad_input(setup, budget, calib, error, message):
    model, images = setup
    with pytest.raises(error, match=message):
        lpvit_plan(model, images if calib is None else calib, budget, model_id="tiny")


def test_prune_cli_with_a_budget(capsys, tmp_path):
    from vitsparse.cli import main
    from vitsparse.data.digits import DIGITS_MODEL
    from vitsparse.plan import PruningPlan

    out = tmp_path / "plan.json"
    code = main(
        [
            "prune",
            DIGITS_MODEL,
            "--method",
            "lpvit",
            "--budget",
            "flops=0.6",
            "--calib",
            "digits-train",
            "--calib-size",
            "64",
            "-o",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and PruningPlan.load(out).method == "lpvit"
    # The budget holds, to within LPViT's granularity (16x16 blocks of a small model; where in
    # it the allocation stops depends on the digits ViT this host trained).
    kept = re.search(r"predicted ([0-9.]+)% of the model's FLOPs kept", printed)
    assert kept and 59.0 <= float(kept.group(1)) <= 60.0, printed
    assert "fidelity  on digits-train (64 images): top-1 agreement" in printed
    code = main(["prune", DIGITS_MODEL, "--method", "lpvit", "-o", str(out)])
    assert code == 2 and "lpvit needs a budget" in capsys.readouterr().err
    bad = ["prune", DIGITS_MODEL, "--method", "random", "--budget", "flops=0.5"]
    code = main([*bad, "-o", str(tmp_path / "x.json")])
    assert code == 2 and "unknown criterion 'random'; known: magnitude" in capsys.readouterr().err
    code = main([*bad[:3], "lpvit", *bad[4:], "--heads", "0.5", "-o", str(tmp_path / "x.json")])
    assert code == 2 and "do not also give heads" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
