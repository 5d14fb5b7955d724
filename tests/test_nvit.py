"""The NViT criterion: per-unit gradients are the sum of theta * dL/dtheta over the weights leaving
the unit, plans meet FLOPs and params budgets above the floors, are deterministic and compile equal
to PyTorch, the cost term prunes a costlier structure more, and bad input is refused."""

import numpy as np
import pytest
import torch
from _compiled import assert_compiled_matches_torch

from vitsparse.data.sources import load_images
from vitsparse.errors import DataError, PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.plan import Structure, apply_structure, validate_plan
from vitsparse.pruning.budget import Budget, FlopsCost
from vitsparse.pruning.nvit import nvit_plan, unit_gradients


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4, mlp_ratio=4.0)
    calib = load_images("synthetic", image_size=32, limit=24).images
    return model, calib


def test_unit_gradient_is_theta_times_gradient_of_the_outgoing_weights(setup):
    model, calib = setup
    labels = torch.arange(len(calib)) % 10
    grads = unit_gradients(model, Structure(), calib, labels, batch=8)
    assert grads["embed"].shape == (24, 64) and grads[(1, "mlp")].shape == (24, 256)
    # Independent: one plain backward pass through the same (unpruned) reference model.
    ref = apply_structure(model, Structure())
    loss = torch.nn.functional.cross_entropy(ref(calib), labels, reduction="sum")
    loss.backward()
    fc2 = ref.blocks[1].mlp.fc2.weight
    expect = (fc2 * fc2.grad).sum(dim=0).detach().double().numpy()  # per neuron: its fc2 column
    np.testing.assert_allclose(grads[(1, "mlp")].sum(axis=0), expect, rtol=1e-3, atol=1e-5)
    proj = ref.blocks[0].attn.proj.weight  # a head: its proj columns (4 heads of 16 dims)
    per_head = (proj * proj.grad).detach().sum(dim=0).reshape(4, 16).sum(dim=1).double().numpy()
    np.testing.assert_allclose(grads[(0, "heads")].sum(axis=0), per_head, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("budget", [Budget("flops", 0.5), Budget("params", 0.6)])
def test_plan_meets_its_budget_above_the_floors(setup, budget):
    model, calib = setup
    plan = nvit_plan(model, calib, budget, model_id="tiny", steps=4)
    validate_plan(plan, model)
    assert budget.fraction - 0.08 < budget.kept(model, plan) <= budget.fraction
    s = plan.structure
    assert len(s.embed.kept) >= 16
    for block in s.blocks.values():
        assert len(block.heads.kept) >= 2 and len(block.mlp.kept) >= 16
        assert len(block.qk_dims.kept) >= 8 and len(block.v_dims.kept) >= 8
    assert plan.budget["eta"] == 0.1 and plan.method == "nvit"
    assert nvit_plan(model, calib, budget, model_id="tiny", steps=4) == plan


def test_compiled_nvit_model_matches_pytorch(setup):
    model, calib = setup
    plan = nvit_plan(model, calib, Budget("flops", 0.5), model_id="tiny", steps=3)
    assert_compiled_matches_torch(model, plan, batch=2)


class _CostlyMlp(FlopsCost):
    """FLOPs, plus a large cost per kept MLP neuron of block 0."""

    def model_cost(self, model, structure):
        mlp = structure.block(0).mlp
        kept = 256 if mlp is None else len(mlp.kept)
        return super().model_cost(model, structure) + 1e9 * kept


def test_a_costlier_structure_is_pruned_more(setup):
    model, calib = setup
    budget = Budget("flops", 0.6)
    plain = nvit_plan(model, calib, budget, model_id="tiny", steps=2, eta=0.5)
    costly = nvit_plan(model, calib, budget, model_id="tiny", steps=2, eta=0.5, cost=_CostlyMlp())
    assert len(costly.structure.block(0).mlp.kept) < len(plain.structure.block(0).mlp.kept)


def test_bad_input(setup):
    model, calib = setup
    with pytest.raises(DataError, match="calibration set is empty"):
        nvit_plan(model, calib[:0], Budget("flops", 0.5), model_id="tiny")
    with pytest.raises(PlanError, match="below what nvit reaches at its floors"):
        nvit_plan(model, calib, Budget("flops", 0.02), model_id="tiny", steps=2)
    with pytest.raises(PlanError, match="steps must be at least 1"):
        nvit_plan(model, calib, Budget("flops", 0.5), model_id="tiny", steps=0)
    with pytest.raises(PlanError, match="eta must be >= 0"):
        nvit_plan(model, calib, Budget("flops", 0.5), model_id="tiny", eta=-1)
