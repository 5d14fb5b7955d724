"""The CP-ViT criterion: attention statistics, layer-aware cascaded keep counts that meet the FLOPs
budget, head keeps, deterministic, compiled equal to PyTorch, and bad input."""

import numpy as np
import pytest
from _compiled import assert_compiled_matches_torch

from vitsparse.data.sources import load_images
from vitsparse.errors import DataError, PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.plan import validate_plan
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.cpvit import AttentionStats, attention_stats, cpvit_plan


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(depth=4, embed_dim=32, num_heads=4, patch_size=4)  # 64 patches
    calib = load_images("synthetic", image_size=32, limit=16).images
    return model, calib


def test_attention_stats(setup):
    model, calib = setup
    stats = attention_stats(model, calib, batch=5)
    assert stats.range.shape == (4,) and ((stats.range > 0) & (stats.range < 2)).all()
    assert [h.shape for h in stats.heads] == [(4,)] * 4
    assert all((h > 0).all() for h in stats.heads)
    w = stats.weights
    assert w.max() == 1 and (np.diff(w) >= 0).all()  # rises with depth
    again = attention_stats(model, calib, batch=16)  # batching does not change them
    np.testing.assert_allclose(again.range, stats.range, rtol=1e-9)


def _counts(plan, depth, patches):
    tokens, heads, left = [], [], patches
    for i in range(depth):
        block = plan.structure.block(i)
        left = block.tokens.keep if block.tokens is not None else left
        tokens.append(left)
        heads.append(4 if block.heads is None else len(block.heads.kept))
    return tokens, heads


def test_plan_meets_its_budget_with_a_cascade(setup):
    model, calib = setup
    plan = cpvit_plan(model, calib, Budget("flops", 0.5), model_id="tiny")
    validate_plan(plan, model)
    assert 0.45 < Budget("flops", 0.5).kept(model, plan) <= 0.5
    tokens, heads = _counts(plan, 4, 64)
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] < 64
    assert heads == sorted(heads, reverse=True)
    rules = {b.tokens.rule for b in plan.structure.blocks.values() if b.tokens is not None}
    assert rules == {"cumulative_attention"}
    assert cpvit_plan(model, calib, Budget("flops", 0.5), model_id="tiny") == plan


def test_local_layers_are_pruned_less(setup):
    model, calib = setup
    heads = [np.array([4.0, 3.0, 2.0, 1.0])] * 4
    local_first = AttentionStats(range=np.array([0.05, 0.1, 1.0, 1.0]), heads=heads)
    flat = AttentionStats(range=np.ones(4), heads=heads)
    budget = Budget("flops", 0.6)
    a = cpvit_plan(model, calib, budget, model_id="tiny", stats=local_first, head_share=0)
    b = cpvit_plan(model, calib, budget, model_id="tiny", stats=flat, head_share=0)
    tokens_a, _ = _counts(a, 4, 64)
    tokens_b, _ = _counts(b, 4, 64)
    assert tokens_a[0] > tokens_b[0]  # the local first block keeps more of its tokens
    assert tokens_a[-1] < tokens_b[-1]  # and the global later ones make up for it
    # Heads: the highest-scoring ones are kept.
    c = cpvit_plan(model, calib, budget, model_id="tiny", stats=flat, head_share=1)
    kept = [b.heads.kept for b in c.structure.blocks.values() if b.heads is not None]
    assert kept and all(k == tuple(range(len(k))) for k in kept)


def test_compiled_cpvit_model_matches_pytorch(setup):
    model, calib = setup
    plan = cpvit_plan(model, calib, Budget("flops", 0.6), model_id="tiny")
    assert_compiled_matches_torch(model, plan, batch=2)


def test_bad_input(setup):
    model, calib = setup
    with pytest.raises(DataError, match="calibration set is empty"):
        cpvit_plan(model, calib[:0], Budget("flops", 0.5), model_id="tiny")
    with pytest.raises(PlanError, match="tokens, which save no weights"):
        cpvit_plan(model, calib, Budget("params", 0.5), model_id="tiny")
    with pytest.raises(PlanError, match="below what cpvit reaches"):
        cpvit_plan(model, calib, Budget("flops", 0.01), model_id="tiny")
    with pytest.raises(PlanError, match="head_share must be in"):
        cpvit_plan(model, calib, Budget("flops", 0.5), model_id="tiny", head_share=2)
    with pytest.raises(PlanError, match="min_tokens must be in 1..64"):
        cpvit_plan(model, calib, Budget("flops", 0.5), model_id="tiny", min_tokens=0)
