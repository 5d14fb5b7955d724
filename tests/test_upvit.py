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


def _naive_kl(model, proxy, block, channel):
    """KL with one MLP neuron zeroed, by a plain full forward pass (no batching, no caching)."""
    with torch.no_grad():
        log_p = model.eval()(proxy).log_softmax(-1)
        handle = model.blocks[block].mlp.act.register_forward_hook(
            lambda _m, _i, out: out.index_fill(-1, torch.tensor([channel]), 0)
        )
        try:
            log_q = model(proxy).log_softmax(-1)
        finally:
            handle.remove()
    return float((log_p.exp() * (log_p - log_q)).sum())


def test_batched_importance_equals_one_pass_per_channel(setup):
    model, proxy = setup
    batched = importance(model, proxy, batch=1000)  # every channel of a family in one pass
    single = importance(model, proxy, batch=1)  # one channel per pass
    for a, b in zip(
        batched["mlp"] + batched["heads"], single["mlp"] + single["heads"], strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(batched["embed"], single["embed"], rtol=1e-3, atol=1e-6)
    for block, channel in ((0, 3), (1, 17)):
        assert batched["mlp"][block][channel] == pytest.approx(
            _naive_kl(model, proxy, block, channel), rel=1e-3, abs=1e-6
        )


def test_progress_bar(setup):
    model, proxy = setup
    lines = []
    importance(model, proxy, progress=lines.append)
    assert lines[0].startswith("[upvit] 168 channels x 8 images [....")
    assert lines[-1].endswith("100% 168/168")


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
    with pytest.raises(PlanError, match="below what upvit's uniform structures reach"):
        upvit_plan(model, proxy, Budget("flops", 0.001), model_id="tiny")


def test_params_budget(setup):
    model, proxy = setup
    plan = upvit_plan(model, proxy, Budget("params", 0.5), model_id="tiny")
    assert 0.4 < vitsparse.params(model, plan) / vitsparse.params(model) <= 0.5
