"""PruneHeads, PruneMLP, PruneEmbedding, PruneTokens: the structure in the IR, and the compiled
pruned model against PyTorch running the same plan (apply_plan_to_torch)."""

import numpy as np
import pytest
import torch
from _compiled import assert_compiled_matches_torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vitsparse._tvm import relax, struct_shape, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import import_model
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.compile import compile_model
from vitsparse.passes._slicing import SLICES_ATTR, follow_reshape, slice_params
from vitsparse.passes.prune_mlp import PruneMLP
from vitsparse.passes.prune_tokens import PruneTokens
from vitsparse.plan import BlockStructure, IndexSet, PruningPlan, Structure, TokenKeep, weights_hash
from vitsparse.pruning import compose_plan, structure_plan


def _plan(model, structure, block_spec=None):
    return compose_plan(
        model, model_id="tiny", method="magnitude", structure=structure, block_spec=block_spec
    )


def _check(model, plan, batch=1, seed=0):
    return assert_compiled_matches_torch(model, plan, batch=batch, seed=seed)


@pytest.fixture(scope="module")
def tiny():
    return tiny_vit(depth=3, embed_dim=64, num_heads=4).eval()


def test_follow_reshape():
    assert follow_reshape((17, 128), (1, 17, 128), (17, 32)) == (1, 17, 32)
    assert follow_reshape((1, 17, 4, 16), (1, 17, 64), (1, 17, 2, 16)) == (1, 17, 32)
    assert follow_reshape((1, 4, 17, 17), (4, 17, 17), (1, 2, 9, 9)) == (2, 9, 9)
    assert follow_reshape((64,), (1, 64, 1, 1), (48,)) == (1, 48, 1, 1)
    assert follow_reshape((8, 17, 17), (2, 4, 17, 17), (4, 9, 9)) == (2, 2, 9, 9)  # B*heads
    with pytest.raises(ValueError, match="ambiguous"):
        follow_reshape((2, 96), (4, 3, 16), (2, 48))


def test_prune_mlp_narrows_the_weights_in_the_ir(tiny):
    imported = import_model(tiny)
    structure = Structure(blocks={1: BlockStructure(mlp=IndexSet(128, tuple(range(0, 128, 4))))})
    mod = PruneMLP(structure, imported.graph)(imported.mod)
    params = {p.name: struct_shape(p) for p in mod["main"].params}
    assert params["p_blocks_1_mlp_fc1_weight"] == (32, 64)
    assert params["p_blocks_1_mlp_fc2_weight"] == (64, 32)
    assert params["p_blocks_0_mlp_fc1_weight"] == (128, 64)
    assert set(mod["main"].attrs[SLICES_ATTR]) == {
        "p_blocks_1_mlp_fc1_weight",
        "p_blocks_1_mlp_fc1_bias",
        "p_blocks_1_mlp_fc2_weight",
    }
    sliced = slice_params(mod, imported.params)
    np.testing.assert_array_equal(
        sliced["p_blocks_1_mlp_fc2_weight"], imported.params["p_blocks_1_mlp_fc2_weight"][:, ::4]
    )
    assert imported.mod["main"].attrs.get(SLICES_ATTR) is None  # input untouched


def test_prune_tokens_inserts_a_static_top_k(tiny):
    imported = import_model(tiny)
    structure = Structure(blocks={0: BlockStructure(tokens=TokenKeep(6))})
    mod = PruneTokens(structure, imported.graph)(imported.mod)
    ops = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda n: (
            ops.append(n.op.name)
            if isinstance(n, relax.Call) and isinstance(n.op, tvm.ir.Op)
            else None
        ),
    )
    assert ops.count("relax.argsort") == 1 and ops.count("relax.gather_elements") == 1
    shapes = [struct_shape(n) for n in _calls(mod, "relax.nn.layer_norm")]
    assert shapes[0][1] == 17 and shapes[1][1] == 7  # block 0's MLP already sees 1 + 6 tokens


def _calls(mod, name):
    found = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda n: (
            found.append(n)
            if isinstance(n, relax.Call) and isinstance(n.op, tvm.ir.Op) and n.op.name == name
            else None
        ),
    )
    return found


@pytest.mark.parametrize(
    "kwargs",
    [
        {"heads": 0.5},
        {"mlp": 0.25},
        {"embed": 0.75},
        {"tokens": "0.5@1,3"},
        {"tokens": "0.6@2", "token_rule": "cumulative_attention"},
        {"heads": 0.5, "mlp": 0.5, "embed": 0.5, "tokens": "0.7@1,2"},
    ],
)
def test_each_pass_and_their_composition_match_pytorch(tiny, kwargs):
    _check(tiny, _plan(tiny, structure_plan(tiny, **kwargs)))


@pytest.mark.parametrize(
    "family",
    [
        {"no_embed_class": True, "init_values": 0.1},  # DeiT III: LayerScale, pos on patches
        {"reg_tokens": 3, "no_embed_class": True},  # register tokens (vit_*_reg*)
        {"global_pool": "avg"},  # average pooling (fc_norm)
    ],
    ids=["deit3", "registers", "avg-pool"],
)
def test_vit_families_get_structural_and_token_plans(family):
    """Heads, neurons, embedding channels and tokens of DeiT III, register-token and
    average-pooled ViTs compile to the output of the plan applied in PyTorch."""
    model = tiny_vit(depth=3, embed_dim=64, num_heads=4, **family)
    structure = structure_plan(model, heads=0.5, mlp=0.5, embed=0.75, tokens="0.5@1,2")
    _check(model, _plan(model, structure), batch=2)


def test_unsupported_families_are_refused_by_prune_itself():
    from vitsparse.jobs.prune import prune

    model = tiny_vit(depth=2, class_token=False, global_pool="avg")
    with pytest.raises(PlanError, match="needs a class token .*--heads needs it"):
        prune(model, method="magnitude", heads=0.5)
    with pytest.raises(PlanError, match="needs a class token .*cpvit needs it"):
        prune(model, method="cpvit", budget="flops=0.5")
    assert prune(model, method="magnitude", blocks="16x16:0.5").structure is None


@pytest.mark.parametrize("rule", ["cls_attention", "cumulative_attention"])
def test_tied_token_scores_keep_the_earlier_tokens(tiny, rule):
    """Pruned to zero, a block's q and k make its attention uniform, so every token scores
    the same: the compiled model must keep the same tokens as PyTorch (the earliest). Found by
    the search: a combined plan whose block masks removed every q and k block."""
    import copy

    model = copy.deepcopy(tiny)
    with torch.no_grad():
        qkv = model.blocks[0].attn.qkv
        qkv.weight[: 2 * 64] = 0
        qkv.bias[: 2 * 64] = 0
    _check(model, _plan(model, structure_plan(model, tokens="0.5@1,2", token_rule=rule)))


@pytest.mark.parametrize("rule", ["cls_attention", "cumulative_attention"])
def test_token_pruning_with_a_batch(tiny, rule):
    # At batch > 1 the proj bias add is (B, N, E) + (E,): it must not be taken for the residual.
    plan = _plan(tiny, structure_plan(tiny, heads=0.75, tokens="0.6@1,2", token_rule=rule))
    _check(tiny, plan, batch=3)


def test_structure_composes_with_block_sparsity(tiny):
    structure = structure_plan(tiny, heads=0.5, mlp=0.5)
    plan = _plan(tiny, structure, block_spec=((16, 16), 0.5))
    compiled = _check(tiny, plan, batch=2)
    assert {d["kernel"] for d in compiled.sparsity_decisions} <= {"bsr", "dense"}
    assert [d["shape"][1:] for d in compiled.sparsity_decisions][:2] == [(64, 96), (32, 64)]


def test_uneven_heads_and_dims_per_block(tiny):
    structure = Structure(
        blocks={
            0: BlockStructure(
                heads=IndexSet(4, (1,)),
                qk_dims=IndexSet(16, tuple(range(8))),
                v_dims=IndexSet(16, tuple(range(8, 16))),
            ),
            2: BlockStructure(heads=IndexSet(4, (0, 1, 3)), mlp=IndexSet(128, (5, 77))),
        }
    )
    _check(tiny, _plan(tiny, structure))


def test_unequal_qk_and_v_widths_compile_exactly(tiny):
    # NViT-style: 4 query/key dims and 12 value dims per head (q/k padded to 12 with zeros).
    structure = Structure(
        blocks={
            0: BlockStructure(
                qk_dims=IndexSet(16, (0, 5, 9, 15)), v_dims=IndexSet(16, tuple(range(12)))
            ),
            1: BlockStructure(heads=IndexSet(4, (2, 3)), v_dims=IndexSet(16, (3, 4))),
        }
    )
    _check(tiny, _plan(tiny, structure), batch=2)


def test_padded_attention_with_a_block_mask_is_refused_before_compiling(tiny):
    structure = Structure(blocks={0: BlockStructure(qk_dims=IndexSet(16, tuple(range(8))))})
    plan = _plan(tiny, structure, block_spec=((16, 16), 0.5))
    with pytest.raises(PlanError, match=r"block 0: q/k and v keep different numbers of dims"):
        compile_model(tiny, target="x86", plan=plan)


@st.composite
def _structures(draw):
    def subset(size):
        kept = draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=size))
        return IndexSet(size, tuple(sorted(kept)))

    blocks, left = {}, 16
    for index in range(3):
        tokens = None
        if draw(st.booleans()):
            left = draw(st.integers(1, left))
            rule = draw(st.sampled_from(["cls_attention", "cumulative_attention"]))
            tokens = TokenKeep(left, rule)
        blocks[index] = BlockStructure(
            heads=subset(4) if draw(st.booleans()) else None,
            qk_dims=subset(16) if draw(st.booleans()) else None,
            v_dims=subset(16) if draw(st.booleans()) else None,
            mlp=subset(128) if draw(st.booleans()) else None,
            tokens=tokens,
        )
    embed = subset(64) if draw(st.booleans()) else None
    return Structure(embed=embed, blocks=blocks)


@settings(
    max_examples=6,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: each example compiles
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(structure=_structures())
def test_random_valid_plans_match_pytorch(tiny, structure):
    plan = PruningPlan(
        model_id="tiny", weights_hash=weights_hash(tiny), method="random", structure=structure
    )
    _check(tiny, plan)


def test_deit_tiny_structured_and_token_pruned_matches_pytorch():
    from vitsparse.frontend import load_torch_model

    model, model_id = load_torch_model("deit_tiny_patch16_224")
    structure = structure_plan(model, heads=0.5, mlp=0.5, tokens="0.7@4,7,10")
    plan = compose_plan(model, model_id=model_id, method="magnitude", structure=structure)
    _check(model.eval(), plan)


def test_deit_small_distilled_keeps_both_prefix_tokens():
    from vitsparse.frontend import load_torch_model

    model, model_id = load_torch_model("deit_small_distilled_patch16_224")
    structure = structure_plan(model, heads=0.5, embed=0.75, tokens="0.7@4,7,10")
    plan = compose_plan(model, model_id=model_id, method="magnitude", structure=structure)
    _check(model.eval(), plan)


def test_structural_plans_need_the_pytorch_import(tiny, tmp_path):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True, verbose=False)
    plan = _plan(tiny, structure_plan(tiny, mlp=0.5))
    with pytest.raises(PlanError, match="compiles PyTorch imports only"):
        compile_model(path, target="x86", plan=plan)
