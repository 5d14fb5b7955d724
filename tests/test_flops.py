"""FLOPs accounting: the analytic count against a hand count and against the Relax module's own
matmuls, and the CP-ViT token-pruning claim."""

import pytest

import vitsparse
from vitsparse.frontend import import_model, load_torch_model
from vitsparse.frontend.testing import tiny_vit
from vitsparse.pruning import compose_plan, structure_plan


@pytest.fixture(scope="module")
def deit_small():
    model, _ = load_torch_model("deit_small_patch16_224")
    return model


def _deit_small_macs(tokens_per_block, heads=6, head_dim=64, hidden=1536, embed=384):
    """DeiT-S by hand: patch embedding, then per block qkv, QK^T and AV, proj, fc1 + fc2."""
    macs = 196 * (3 * 16 * 16) * embed + embed * 1000
    for n_in, n_out in tokens_per_block:
        macs += n_in * embed * 3 * heads * head_dim
        macs += 2 * heads * n_in * n_in * head_dim
        macs += n_in * heads * head_dim * embed
        macs += 2 * n_out * embed * hidden
    return macs


def test_dense_deit_small_matches_the_hand_count(deit_small):
    report = vitsparse.flops(deit_small)
    assert report.macs == _deit_small_macs([(197, 197)] * 12)
    assert 4.5e9 < report.macs < 4.7e9  # DeiT-S: 4.6 GFLOPs (MACs) in the DeiT paper
    assert report.flops == 2 * report.macs


def test_the_relax_module_agrees(deit_small):
    imported = import_model(deit_small)
    assert vitsparse.flops(imported.mod).macs == vitsparse.flops(deit_small).macs


def test_structure_and_masks_are_counted():
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    structure = structure_plan(model, heads=0.5, mlp=0.25, tokens="0.5@1")
    plan = compose_plan(
        model, model_id="tiny", method="magnitude", structure=structure, block_spec=((16, 16), 0.5)
    )
    dense = vitsparse.flops(model)
    pruned = vitsparse.flops(model, plan)
    # block 0: 17 tokens in, 9 out (8 patches + class token); block 1: 9 in and out.
    e, h, d = 64, 2, 16
    expected = 16 * 192 * e + e * 10
    for n_in, n_out in ((17, 9), (9, 9)):
        expected += n_in * e * 3 * h * d // 2 + 2 * h * n_in * n_in * d + n_in * h * d * e // 2
        expected += n_out * e * 32
    assert pruned.macs == expected
    assert pruned.ratio(dense) < 0.5


def test_cp_vit_claim_progressive_token_pruning_removes_over_40_percent(deit_small):
    # Schedule: keep 79.37% of the patch tokens after blocks 1, 2 and 3 (1-based):
    # 196 -> 156 -> 124 -> 98, i.e. half of the patch tokens are gone from block 4 on.
    structure = structure_plan(deit_small, tokens="0.7937@1,2,3")
    assert structure.token_schedule(196, 12) == [196, 156, 124, 98] + [98] * 9
    plan = compose_plan(deit_small, model_id="deit_small", method="magnitude", structure=structure)
    removed = 1 - vitsparse.flops(deit_small, plan).ratio(vitsparse.flops(deit_small))
    assert removed > 0.40
    hand = _deit_small_macs(
        [(197, 157), (157, 125), (125, 99)] + [(99, 99)] * 9
    ) / _deit_small_macs([(197, 197)] * 12)
    assert 1 - hand == pytest.approx(removed)
