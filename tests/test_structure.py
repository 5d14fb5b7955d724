"""Structural pruning plans (format version 2) and their PyTorch reference."""

import json

import numpy as np
import pytest
import torch

from vitsparse.errors import PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.plan import (
    BlockStructure,
    IndexSet,
    PruningPlan,
    Structure,
    TokenKeep,
    apply_plan_to_torch,
    weights_hash,
)


def _plan(model, structure, layers=None):
    return PruningPlan(
        model_id="tiny",
        weights_hash=weights_hash(model),
        method="hand",
        layers=layers or {},
        structure=structure,
    )


def _run(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def tiny():
    model = tiny_vit(depth=3, embed_dim=64, num_heads=4).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    return model, x


def test_empty_structure_is_the_model(tiny):
    model, x = tiny
    pruned = apply_plan_to_torch(model, _plan(model, Structure()))
    np.testing.assert_allclose(_run(pruned, x), _run(model, x), atol=1e-5)


def test_keeping_everything_explicitly_is_the_model(tiny):
    model, x = tiny
    whole = BlockStructure(
        heads=IndexSet(4, tuple(range(4))),
        qk_dims=IndexSet(16, tuple(range(16))),
        v_dims=IndexSet(16, tuple(range(16))),
        mlp=IndexSet(128, tuple(range(128))),
        tokens=TokenKeep(16, "cls_attention"),
    )
    structure = Structure(embed=IndexSet(64, tuple(range(64))), blocks={0: whole, 2: whole})
    pruned = apply_plan_to_torch(model, _plan(model, structure))
    np.testing.assert_allclose(_run(pruned, x), _run(model, x), atol=1e-5)


def test_pruned_reference_shapes_and_plan_round_trip(tiny, tmp_path):
    model, x = tiny
    structure = Structure(
        embed=IndexSet(64, tuple(i for i in range(64) if i % 4)),
        blocks={
            0: BlockStructure(
                heads=IndexSet(4, (0, 3)),
                qk_dims=IndexSet(16, tuple(range(8))),
                v_dims=IndexSet(16, tuple(range(4, 16))),
                mlp=IndexSet(128, tuple(range(0, 128, 2))),
                tokens=TokenKeep(10, "cls_attention"),
            ),
            2: BlockStructure(heads=IndexSet(4, (1,)), tokens=TokenKeep(4, "cumulative_attention")),
        },
    )
    plan = _plan(model, structure)
    pruned = apply_plan_to_torch(model, plan)
    assert pruned.get_submodule("blocks.0.attn.qkv").weight.shape == (2 * (8 + 8 + 12), 48)
    assert pruned.get_submodule("blocks.0.attn.proj").weight.shape == (48, 24)
    assert pruned.get_submodule("blocks.0.mlp.fc1").weight.shape == (64, 48)
    assert pruned.get_submodule("head").weight.shape == (10, 48)
    out = _run(pruned, x)
    assert out.shape == (2, 10) and np.isfinite(out).all()
    assert np.abs(out - _run(model, x)).max() > 1e-3

    loaded = PruningPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.structure == plan.structure and loaded.version == 2
    np.testing.assert_array_equal(_run(apply_plan_to_torch(model, loaded), x), out)


def test_version_1_plans_still_read(tiny, tmp_path):
    model, _ = tiny
    data = _plan(model, None).to_json()
    data["version"] = 1
    del data["structure"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    assert PruningPlan.load(path).structure is None


def test_tokens_cascade(tiny):
    model, _ = tiny
    structure = Structure(
        blocks={0: BlockStructure(tokens=TokenKeep(8)), 1: BlockStructure(tokens=TokenKeep(6))}
    )
    assert structure.token_schedule(16, 3) == [16, 8, 6, 6]
    bad = Structure(
        blocks={0: BlockStructure(tokens=TokenKeep(8)), 1: BlockStructure(tokens=TokenKeep(9))}
    )
    with pytest.raises(PlanError, match="block 1, tokens: keeps 9 patch tokens, but only 8"):
        apply_plan_to_torch(model, _plan(model, bad))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: IndexSet(4, ()), "keeps nothing"),
        (lambda: IndexSet(4, (0, 4)), r"out of range for a size of 4"),
        (lambda: IndexSet(4, (2, 1)), "sorted and distinct"),
        (lambda: TokenKeep(0), "positive integer"),
        (lambda: TokenKeep(3, "evit"), "not one of cls_attention, cumulative_attention"),
    ],
)
def test_malformed_structures_are_rejected(make, match):
    part = make()
    block = (
        BlockStructure(heads=part) if isinstance(part, IndexSet) else BlockStructure(tokens=part)
    )
    with pytest.raises(PlanError, match=match):
        Structure(blocks={0: block})


@pytest.mark.parametrize(
    ("structure", "match"),
    [
        (Structure(blocks={5: BlockStructure()}), r"has 3 blocks \(0..2\)"),
        (Structure(blocks={0: BlockStructure(heads=IndexSet(6, (0,)))}), "heads: plan is for 6"),
        (Structure(embed=IndexSet(96, (0,))), "embed: plan is for 96 channels"),
        (Structure(blocks={1: BlockStructure(tokens=TokenKeep(17))}), "only 16 reach it"),
    ],
)
def test_structures_that_do_not_fit_the_model(tiny, structure, match):
    model, _ = tiny
    with pytest.raises(PlanError, match=match):
        apply_plan_to_torch(model, _plan(model, structure))
