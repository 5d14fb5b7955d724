"""The UP-ViT criterion: KL leave-one-out importance, a structural plan within its FLOPs budget,
deterministic, compiled equal to PyTorch, and bad input."""

import numpy as np
import pytest
import torch
from _compiled import assert_compiled_matches_torch

import vitsparse
from vitsparse.data.sources import load_images
from vitsparse.errors import DataError, PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.plan import validate_plan
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.upvit import importance, upvit_plan


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(depth=2, embed_dim=32, num_heads=4)
    proxy = load_images("synthetic", image_size=32, limit=8).images
    return model, proxy


def test_importance_is_a_kl_per_channel(setup):
    model, proxy = setup
    scores = importance(model, proxy)
    assert [s.shape for s in scores["mlp"]] == [(64,), (64,)]
    assert [s.shape for s in scores["heads"]] == [(4,), (4,)] and scores["embed"].shape == (32,)
    for part in (*scores["mlp"], *scores["heads"], scores["embed"]):
        assert (part >= -1e-6).all() and part.max() > 0  # KL: non-negative, informative
    with torch.no_grad():  # the hooks are gone afterwards
        np.testing.assert_array_equal(model(proxy).numpy(), model(proxy).numpy())


def test_plan_meets_its_budget_is_uniform_and_deterministic(setup):
    model, proxy = setup
    plan = upvit_plan(model, proxy, Budget("flops", 0.6), model_id="tiny")
    validate_plan(plan, model)
    kept = vitsparse.flops(model, plan).ratio(vitsparse.flops(model))
    assert 0.45 < kept <= 0.6
    blocks = plan.structure.blocks
    assert len({len(b.heads.kept) for b in blocks.values()}) == 1  # the same ratio in every block
    assert len({len(b.mlp.kept) for b in blocks.values()}) == 1
    assert upvit_plan(model, proxy, Budget("flops", 0.6), model_id="tiny") == plan


def test_compiled_upvit_model_matches_pytorch(setup):
    model, proxy = setup
    plan = upvit_plan(model, proxy, Budget("flops", 0.5), model_id="tiny")
    assert_compiled_matches_torch(model, plan)


def test_bad_input(setup):
    model, proxy = setup
    with pytest.raises(DataError, match="proxy .* set is empty"):
        upvit_plan(model, proxy[:0], Budget("flops", 0.5), model_id="tiny")
    with pytest.raises(PlanError, match="upvit spends a FLOPs budget"):
        upvit_plan(model, proxy, Budget("params", 0.5), model_id="tiny")
