"""One interface for every criterion: each makes a valid, deterministic plan within its budget on a
small ViT; knobs are checked; the magnitude baselines; weights counting; `prune --method` for every
criterion from the command line."""

import numpy as np
import pytest
from _compiled import assert_compiled_matches_torch

import vitsparse
from vitsparse.cli import main
from vitsparse.data.sources import load_images
from vitsparse.errors import PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.plan import PruningPlan, validate_plan
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.criteria import CRITERIA, criterion, make_plan, parse_knob_args
from vitsparse.pruning.fractions import magnitude_scores

FAST = {"nvit": {"steps": 2}}  # knobs that keep the unit tests quick


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4, patch_size=4)
    calib = load_images("synthetic", image_size=32, limit=12).images
    return model, calib


@pytest.mark.parametrize("method", list(CRITERIA))
def test_every_criterion_meets_its_budget_deterministically(setup, method):
    model, calib = setup
    budget = Budget("flops", 0.6)
    knobs = FAST.get(method, {})
    plan = make_plan(method, model, calib, budget, model_id="tiny", knobs=knobs)
    validate_plan(plan, model)
    assert plan.method == method
    assert 0.45 < budget.kept(model, plan) <= 0.6
    assert make_plan(method, model, calib, budget, model_id="tiny", knobs=knobs) == plan


@pytest.mark.parametrize("method", [m for m, c in CRITERIA.items() if "params" in c.metrics])
def test_params_budgets(setup, method):
    model, calib = setup
    budget = Budget("params", 0.5)
    plan = make_plan(method, model, calib, budget, model_id="tiny", knobs=FAST.get(method))
    assert 0.35 < vitsparse.params(model, plan) / vitsparse.params(model) <= 0.5


def test_structure_baseline_compiles_to_pytorch(setup):
    model, calib = setup
    plan = make_plan(
        "magnitude", model, calib, Budget("flops", 0.5), model_id="t", knobs={"kind": "structure"}
    )
    assert plan.structure is not None and not plan.layers
    assert_compiled_matches_torch(model, plan)


def test_structure_l2_scores(setup):
    model, _ = setup
    l2 = magnitude_scores(model, norm="l2")
    w = model.blocks[1].mlp.fc1.weight.detach().double().numpy()
    w2 = model.blocks[1].mlp.fc2.weight.detach().double().numpy()
    expect = np.sqrt((w**2).sum(axis=1) + (w2**2).sum(axis=0))
    np.testing.assert_allclose(l2["mlp"][1], expect)
    with pytest.raises(PlanError, match="norm 'l3' is not"):
        magnitude_scores(model, norm="l3")


def test_params_counts_the_weights():
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4, patch_size=4)
    blocks = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if n.startswith("blocks") and hasattr(m, "weight") and m.weight.dim() == 2
    )
    expect = blocks + model.patch_embed.proj.weight.numel() + model.head.weight.numel()
    assert vitsparse.params(model) == expect


def test_knobs_and_bad_input(setup):
    model, calib = setup
    budget = Budget("flops", 0.5)
    with pytest.raises(PlanError, match="unknown criterion 'obd'; known: magnitude, lpvit"):
        make_plan("obd", model, calib, budget, model_id="t")
    with pytest.raises(PlanError, match=r"nvit has no knob 'beta' \(its knobs: batch, cost, eta"):
        make_plan("nvit", model, calib, budget, model_id="t", knobs={"beta": 1})
    with pytest.raises(PlanError, match="nvit knob steps: invalid literal"):
        make_plan("nvit", model, calib, budget, model_id="t", knobs={"steps": "many"})
    with pytest.raises(PlanError, match="'16' is not a block size ROWSxCOLS"):
        make_plan("lpvit", model, calib, budget, model_id="t", knobs={"block": "16"})
    with pytest.raises(PlanError, match="cpvit cannot spend a params budget"):
        make_plan("cpvit", model, calib, Budget("params", 0.5), model_id="t")
    with pytest.raises(PlanError, match="magnitude kind 'rows' is not one of blocks, structure"):
        make_plan("magnitude", model, None, budget, model_id="t", knobs={"kind": "rows"})
    with pytest.raises(PlanError, match="knob 'eta' is not KEY=VALUE"):
        parse_knob_args(["eta"])
    assert parse_knob_args(["eta = 0.2", "steps=3"]) == {"eta": "0.2", "steps": "3"}
    assert criterion("magnitude").reads_calibration is False


@pytest.mark.parametrize(
    ("method", "extra", "printed"),
    [
        ("nvit", ["--knob", "steps=2"], "qk_dims   kept per block:"),
        ("cpvit", [], "(cumulative_attention)"),
        ("upvit", ["--calib-size", "4"], "mlp       kept per block:"),
        ("magnitude", ["--knob", "kind=structure"], "budget    flops=0.5, uniform_keep="),
    ],
)
def test_prune_cli_for_each_criterion(capsys, tmp_path, method, extra, printed):
    from vitsparse.data.digits import DIGITS_MODEL

    out = tmp_path / "plan.json"
    args = ["prune", DIGITS_MODEL, "--method", method, "--budget", "flops=0.5"]
    args += ["--calib", "digits-train", "--calib-size", "16", *extra, "-o", str(out)]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert PruningPlan.load(out).method == method
    assert printed in captured.out
    assert "predicted 4" in captured.out and "fidelity  on digits-train" in captured.out
    assert "% of the model's weights kept" in captured.out
    if method != "magnitude":
        assert "100%" in captured.err  # the progress bar reached its end


def test_prune_help_names_every_knob(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, spec in CRITERIA.items():
        assert f"{name} {'/'.join(spec.knobs)}" in text


def test_prune_cli_bad_knob_exits_2(capsys, tmp_path):
    from vitsparse.data.digits import DIGITS_MODEL

    out = tmp_path / "plan.json"
    args = ["prune", DIGITS_MODEL, "--method", "cpvit", "--budget", "flops=0.5"]
    code = main([*args, "--knob", "eta=1", "-o", str(out)])
    assert code == 2 and "cpvit has no knob 'eta'" in capsys.readouterr().err
    assert not out.exists()
