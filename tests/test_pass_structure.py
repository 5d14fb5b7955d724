"""The IR each structural and sparse Relax pass writes, on small hand-written modules: parameter
shapes, the ops it emits and their order, call_tir targets, constants and function attributes
(numbers against PyTorch live in test_structural_passes.py and test_block_sparsify.py)."""

import numpy as np
import pytest

from vitsparse._tvm import relax, struct_shape, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend.vit_graph import BlockInfo, ViTGraph
from vitsparse.passes._rewrite import const_array
from vitsparse.passes._slicing import SLICES_ATTR
from vitsparse.passes.annotate_pruning import PRUNING_ATTR, AnnotatePruning
from vitsparse.passes.bind_weights import BindWeights
from vitsparse.passes.block_sparsify import BlockSparsify
from vitsparse.passes.lower_linear import LowerLinear
from vitsparse.passes.patch_embed_to_dense import PatchEmbedToDense
from vitsparse.passes.prune_embedding import PruneEmbedding
from vitsparse.passes.prune_heads import PruneHeads, check_supported
from vitsparse.passes.prune_mlp import PruneMLP
from vitsparse.passes.prune_tokens import PruneTokens
from vitsparse.plan import BlockMask, BlockStructure, IndexSet, PruningPlan, Structure, TokenKeep
from vitsparse.schedules import bsr, dense

F32 = "float32"


# --- building small modules and reading them back ----------------------------------------------


def _module(params: dict, body) -> tvm.IRModule:
    """main(**params) (float32 tensors, the first one the input) whose dataflow block is what
    ``body(bb, vars)`` emits; the expr it returns becomes the output."""
    bb = relax.BlockBuilder()
    names = {name: relax.Var(name, relax.TensorType(shape, F32)) for name, shape in params.items()}
    with bb.function("main", list(names.values()), attrs={"num_input": 1}):
        with bb.dataflow():
            gv = bb.emit_output(body(bb, names))
        bb.emit_func_output(gv)
    return bb.get()


def _linear(bb, x, w, b):
    """The import's linear layer: add(b, matmul(x, permute_dims(w)))."""
    wt = bb.emit(relax.op.permute_dims(w, [1, 0]))
    return bb.emit(relax.op.add(b, bb.emit(relax.op.matmul(x, wt, out_dtype=F32))))


def _mlp(hidden, fc2_bias=True):
    """x (1, 4, 8) -> fc1 (hidden x 8) on (4, 8) rows -> GELU -> fc2 (8 x hidden) on the
    (1, 4, hidden) activations."""

    def body(bb, p):
        h = _linear(bb, bb.emit(relax.op.reshape(p["x"], (4, 8))), p["w1"], p["b1"])
        h = bb.emit(relax.op.nn.gelu(bb.emit(relax.op.reshape(h, (1, 4, hidden)))))
        out = relax.op.matmul(h, bb.emit(relax.op.permute_dims(p["w2"], [1, 0])), out_dtype=F32)
        return relax.op.add(p["b2"], bb.emit(out)) if fc2_bias else out

    params = {"x": (1, 4, 8), "w1": (hidden, 8), "b1": (hidden,), "w2": (8, hidden), "b2": (8,)}
    return _module({k: v for k, v in params.items() if fc2_bias or k != "b2"}, body)


def _attention(bb, x, p, i, heads, hd, on_softmax=None):
    """One attention shaped like the import's: qkv split by one reshape to (1, n, 3, heads, hd),
    softmax, proj, the residual add; returns (residual, softmax output)."""
    n, e = struct_shape(x)[1:]
    qkv = _linear(bb, bb.emit(relax.op.reshape(x, (n, e))), p[f"qkv_w{i}"], p[f"qkv_b{i}"])
    qkv = bb.emit(relax.op.reshape(qkv, (1, n, 3 * heads * hd)))
    qkv = bb.emit(relax.op.reshape(qkv, (1, n, 3, heads, hd)))
    qkv = bb.emit(relax.op.permute_dims(qkv, [2, 0, 3, 1, 4]))
    q, k, v = (
        bb.emit(relax.op.squeeze(bb.emit(relax.op.strided_slice(qkv, [0], [j], [j + 1])), [0]))
        for j in range(3)
    )
    kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
    scores = bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(q, kt)), relax.const(0.5, F32)))
    probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    if on_softmax is not None:
        on_softmax(bb, i, probs)
    out = bb.emit(relax.op.permute_dims(bb.emit(relax.op.matmul(probs, v)), [0, 2, 1, 3]))
    out = bb.emit(relax.op.reshape(out, (n, heads * hd)))
    out = _linear(bb, out, p[f"proj_w{i}"], p[f"proj_b{i}"])
    return bb.emit(relax.op.add(x, bb.emit(relax.op.reshape(out, (1, n, e))))), probs


def _attention_module(widths=((2, 4),), on_softmax=None, on_residual=None):
    """x (1, 5, 8) through one attention per (heads, head_dim) in ``widths``, then times 2; the
    hooks emit what a pass should have inserted (for Expected modules)."""
    params = {"x": (1, 5, 8)}
    for i, (heads, hd) in enumerate(widths):
        params.update({f"qkv_w{i}": (3 * heads * hd, 8), f"qkv_b{i}": (3 * heads * hd,)})
        params.update({f"proj_w{i}": (8, heads * hd), f"proj_b{i}": (8,)})

    def body(bb, p):
        x = p["x"]
        for i, (heads, hd) in enumerate(widths):
            x, probs = _attention(bb, x, p, i, heads, hd, on_softmax)
            x = x if on_residual is None else on_residual(bb, i, x, probs)
        return relax.op.multiply(x, relax.const(2.0, F32))

    return _module(params, body)


def _graph(depth=1, param_map=None):
    """The ViTGraph of these modules: embed 8, 2 heads of 4, MLP 16, 1 + 4 tokens."""
    names = [f"{n}{{}}" for n in ("qkv_w", "qkv_b", "proj_w", "proj_b")] + ["w1", "b1", "w2", "b2"]
    blocks = tuple(BlockInfo(i, *(n.format(i) for n in names), 8, 2, 4, 16) for i in range(depth))
    return ViTGraph("tiny", blocks, 8, 2, 4, (8, 8), 4, 1, 5, 10, param_map or {})


def _calls(mod):
    """(op, binding var, call) of each operator call bound in main, in order."""
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                yield value.op.name.removeprefix("relax."), binding.var, value


def _ops(mod):
    """The ops main calls, in order; call_tir shows its kernel's name."""
    return [
        f"call_tir:{call.args[0].name_hint}" if op == "call_tir" else op
        for op, _, call in _calls(mod)
    ]


def _const_args(mod, name):
    """For each call of ``name`` in main with constant arguments, those as arrays (call_tir: the
    constants among its tensor arguments)."""
    out = []
    for op, _, call in _calls(mod):
        args = call.args[1].fields if op == "call_tir" else call.args
        consts = [const_array(a) for a in args if const_array(a) is not None]
        if op == name and consts:
            out.append(consts)
    return out


def _with_slices(mod, slices):
    out = tvm.IRModule(dict(mod.functions.items()))
    out["main"] = mod["main"].with_attr(SLICES_ATTR, slices)
    return out


def _plan_error(match):
    """A pass's PlanError, as it leaves the pass (through TVM's FFI, see
    test_a_pass_raises_plan_error)."""
    return pytest.raises(PlanError, match=match)


def _plan(layers):
    return PruningPlan(
        model_id="tiny", weights_hash="sha256:" + "0" * 64, method="magnitude", layers=layers
    )


def _weights(mod):
    rng = np.random.default_rng(1)
    return {p.name: rng.standard_normal(struct_shape(p), F32) for p in mod["main"].params[1:]}


# --- PruneMLP and BindWeights ------------------------------------------------------------------


def _keep_mlp(kept, size=16):
    return Structure(blocks={0: BlockStructure(mlp=IndexSet(size, tuple(kept)))})


def test_prune_mlp_keeps_fc1_rows_and_fc2_columns():
    before = _mlp(16)
    out = PruneMLP(_keep_mlp([1, 5, 6]), _graph())(before)
    slices = {"w1": [[0, [1, 5, 6]]], "b1": [[0, [1, 5, 6]]], "w2": [[1, [1, 5, 6]]]}
    # The activations between fc1 and fc2 are 3 wide: (4, 3), (1, 4, 3) and the GELU on them.
    tvm.ir.assert_structural_equal(out, _with_slices(_mlp(3), slices))
    assert SLICES_ATTR not in before["main"].attrs  # the input module is untouched
    # A plan that leaves the MLP whole changes nothing, not even the attributes.
    heads_only = Structure(blocks={0: BlockStructure(heads=IndexSet(2, (0, 1)))})
    tvm.ir.assert_structural_equal(PruneMLP(heads_only, _graph())(before), before)


def test_bind_weights_applies_the_recorded_slices_in_order():
    twice = PruneMLP(_keep_mlp([0, 2], size=3), _graph())(
        PruneMLP(_keep_mlp([1, 5, 6]), _graph())(_mlp(16))
    )
    steps = [[int(a), [int(i) for i in kept]] for a, kept in twice["main"].attrs[SLICES_ATTR]["w1"]]
    assert steps == [[0, [1, 5, 6]], [0, [0, 2]]]
    params = _weights(_mlp(16))
    originals = {k: v.copy() for k, v in params.items()}
    out = BindWeights(params)(twice)
    assert [p.name for p in out["main"].params] == ["x"]
    assert _ops(out) == _ops(twice)  # binding only replaces parameters by constants
    (w1,), (w2,) = _const_args(out, "permute_dims")
    np.testing.assert_array_equal(w1, params["w1"][[1, 6]])
    np.testing.assert_array_equal(w2, params["w2"][:, [1, 6]])
    (b1,), (b2,) = _const_args(out, "add")
    np.testing.assert_array_equal(b1, params["b1"][[1, 6]])
    np.testing.assert_array_equal(b2, params["b2"])
    assert all(np.array_equal(params[k], originals[k]) for k in params)  # not sliced in place


# --- PruneHeads --------------------------------------------------------------------------------


def test_prune_heads_keeps_the_heads_rows_and_columns():
    structure = Structure(blocks={0: BlockStructure(heads=IndexSet(2, (1,)))})
    out = PruneHeads(structure, _graph())(_attention_module())
    rows = [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]  # head 1 of q, of k, of v
    slices = {"qkv_w0": [[0, rows]], "qkv_b0": [[0, rows]], "proj_w0": [[1, [4, 5, 6, 7]]]}
    # One head of 4: the qkv split reshapes to (1, 5, 3, 1, 4), proj takes 4 inputs.
    tvm.ir.assert_structural_equal(out, _with_slices(_attention_module(((1, 4),)), slices))


def test_prune_heads_pads_the_narrower_of_qk_and_v_with_zero_rows():
    part = BlockStructure(qk_dims=IndexSet(4, (0, 1, 3)), v_dims=IndexSet(4, (0, 2)))
    out = PruneHeads(Structure(blocks={0: part}), _graph())(_attention_module())
    # Both heads keep 3 q/k dims and 2 v dims, the v side padded (-1) to 3: head_dim 3.
    rows = [0, 1, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 18, -1, 20, 22, -1]
    cols = [0, 2, -1, 4, 6, -1]
    slices = {"qkv_w0": [[0, rows]], "qkv_b0": [[0, rows]], "proj_w0": [[1, cols]]}
    tvm.ir.assert_structural_equal(out, _with_slices(_attention_module(((2, 3),)), slices))
    params = _weights(_attention_module())
    bound = BindWeights(params)(out)
    (qkv,), (proj,) = _const_args(bound, "permute_dims")
    padded = np.asarray(rows) < 0
    assert qkv.shape == (18, 8) and proj.shape == (8, 6)
    assert not qkv[padded].any()
    np.testing.assert_array_equal(qkv[~padded], params["qkv_w0"][[r for r in rows if r >= 0]])
    np.testing.assert_array_equal(proj[:, [0, 1, 3, 4]], params["proj_w0"][:, [0, 2, 4, 6]])
    assert not proj[:, [2, 5]].any()
    qkv_bias = _const_args(bound, "add")[0][0]
    np.testing.assert_array_equal(qkv_bias, np.where(padded, 0, params["qkv_b0"][rows]))


def test_check_supported_rejects_masks_on_padded_attention():
    uneven = Structure(blocks={1: BlockStructure(v_dims=IndexSet(4, (0, 2)))})
    even = BlockStructure(qk_dims=IndexSet(4, (0, 2)), v_dims=IndexSet(4, (1, 3)))
    with pytest.raises(PlanError, match=r"block 1: .*blocks\.1\.attn\.proj"):
        check_supported(uneven, {"blocks.1.attn.proj": None})
    check_supported(uneven, {"blocks.0.attn.proj": None, "blocks.1.mlp.fc1": None})
    for part in (even, BlockStructure(heads=IndexSet(2, (0,)))):  # nothing padded
        check_supported(Structure(blocks={1: part}), {"blocks.1.attn.qkv": None})


# --- PruneEmbedding ----------------------------------------------------------------------------

# Relax name -> torch name, as ViTGraph.param_map has it.
EMBED_PARAMS = dict(
    pair.split("=")
    for pair in """cls=cls_token pos=pos_embed pe_w=patch_embed.proj.weight
    pe_b=patch_embed.proj.bias norm_w=norm.weight norm_b=norm.bias head_w=head.weight
    head_b=head.bias""".split()
)


def _embed_module(e):
    """Patch embedding (conv + bias), class token, position embedding, final norm, head."""
    params = {"x": (1, 3, 8, 8), "cls": (1, 1, e), "pos": (1, 5, e), "pe_w": (e, 3, 4, 4)}
    params |= {"pe_b": (e,), "norm_w": (e,), "norm_b": (e,), "head_w": (10, e), "head_b": (10,)}

    def body(bb, p):
        t = bb.emit(relax.op.nn.conv2d(p["x"], p["pe_w"], strides=4))
        t = bb.emit(relax.op.add(t, bb.emit(relax.op.reshape(p["pe_b"], (1, e, 1, 1)))))
        t = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(t, (1, e, 4))), [0, 2, 1]))
        cls = bb.emit(relax.op.broadcast_to(p["cls"], (1, 1, e)))
        t = bb.emit(relax.op.add(bb.emit(relax.op.concat([cls, t], axis=1)), p["pos"]))
        t = bb.emit(relax.op.nn.layer_norm(t, p["norm_w"], p["norm_b"], axes=[-1]))
        t = bb.emit(relax.op.take(t, relax.const(0, "int64"), axis=1, mode="fast"))
        return _linear(bb, t, p["head_w"], p["head_b"])

    return _module(params, body)


def test_prune_embedding_slices_every_weight_on_the_residual_stream():
    kept = [0, 3, 5]
    structure = Structure(embed=IndexSet(8, tuple(kept)))
    out = PruneEmbedding(structure, _graph(param_map=EMBED_PARAMS))(_embed_module(8))
    axes = {"cls": 2, "pos": 2, "pe_w": 0, "pe_b": 0, "norm_w": 0, "norm_b": 0, "head_w": 1}
    slices = {name: [[axis, kept]] for name, axis in axes.items()}  # head_b has no embed axis
    # The reshapes and the class token's broadcast_to follow: (1, 3, 1, 1), (1, 3, 4), (1, 1, 3).
    tvm.ir.assert_structural_equal(out, _with_slices(_embed_module(3), slices))


def test_prune_embedding_rejects_a_parameter_it_does_not_know():
    graph = _graph(param_map={**EMBED_PARAMS, "norm_w": "blocks.0.mystery.weight"})
    with _plan_error("mystery"):
        PruneEmbedding(Structure(embed=IndexSet(8, (0, 1))), graph)(_embed_module(8))


# --- PruneTokens -------------------------------------------------------------------------------


def _keep_tokens(bb, x, top, keep):
    """The gather PruneTokens inserts: the class token, then the patches ``top`` in order."""
    b, n, e = struct_shape(x)
    wide = bb.emit(relax.op.broadcast_to(bb.emit(relax.op.expand_dims(top, -1)), (b, keep, e)))
    patches = bb.emit(relax.op.strided_slice(x, [1], [1], [n]))
    kept = bb.emit(relax.op.gather_elements(patches, wide, 1))
    head = bb.emit(relax.op.strided_slice(x, [1], [0], [1]))
    return bb.emit(relax.op.concat([head, kept], axis=1))


def _top(bb, score, keep):
    order = bb.emit(relax.op.argsort(score, axis=-1, descending=True, dtype="int64"))
    top = bb.emit(relax.op.strided_slice(order, [1], [0], [keep]))
    return bb.emit(relax.op.sort(top, axis=-1))


def test_prune_tokens_cls_attention():
    structure = Structure(blocks={0: BlockStructure(tokens=TokenKeep(2, "cls_attention"))})
    out = PruneTokens(structure, _graph(depth=2))(_attention_module(((2, 4), (2, 4))))

    def select(bb, i, x, probs):
        if i != 0:
            return x
        row = bb.emit(relax.op.strided_slice(probs, [2], [0], [1]))  # the class token's queries
        score = bb.emit(relax.op.mean(row, axis=[1, 2]))
        score = bb.emit(relax.op.strided_slice(score, [1], [1], [5]))
        return _keep_tokens(bb, x, _top(bb, score, 2), 2)

    # Block 1 runs on 1 + 2 tokens: its reshapes and softmax follow ((1, 3, 3, 2, 4), (1, 2, 3, 3)).
    expected = _attention_module(((2, 4), (2, 4)), on_residual=select)
    tvm.ir.assert_structural_equal(out, _with_slices(expected, {}))
    softmax = [struct_shape(v) for op, v, _ in _calls(out) if op == "nn.softmax"]
    assert softmax == [(1, 2, 5, 5), (1, 2, 3, 3)]


def test_prune_tokens_cumulative_attention():
    blocks = {
        0: BlockStructure(tokens=TokenKeep(3, "cumulative_attention")),
        1: BlockStructure(tokens=TokenKeep(2, "cumulative_attention")),
    }
    before = _attention_module(((2, 4), (2, 4)))
    out = PruneTokens(Structure(blocks=blocks), _graph(depth=2))(before)
    state = []

    def accumulate(bb, i, probs):
        strongest = bb.emit(relax.op.max(probs, axis=[2]))  # over queries
        received = bb.emit(relax.op.sum(strongest, axis=[1]))  # over heads
        received = bb.emit(relax.op.strided_slice(received, [1], [1], [struct_shape(probs)[-1]]))
        state.append(bb.emit(relax.op.add(state[-1], received)) if state else received)

    def select(bb, i, x, probs):
        keep = (3, 2)[i]
        top = _top(bb, state[-1], keep)
        state.append(bb.emit(relax.op.gather_elements(state[-1], top, 1)))  # follows the tokens
        return _keep_tokens(bb, x, top, keep)

    expected = _attention_module(((2, 4), (2, 4)), on_softmax=accumulate, on_residual=select)
    tvm.ir.assert_structural_equal(out, _with_slices(expected, {}))


# --- AnnotatePruning ---------------------------------------------------------------------------

KEEP = np.array([[1, 0], [0, 1]], bool)


def _twice(weight=None):
    """Two linear layers sharing one (16, 16) weight (``weight(bb, w)`` replaces its uses)."""

    def body(bb, p):
        w = p["w"] if weight is None else weight(bb, p["w"])
        return _linear(bb, _linear(bb, p["x"], w, p["b"]), w, p["b"])

    return _module({"x": (4, 16), "w": (16, 16), "b": (16,)}, body)


def test_annotate_pruning_masks_the_weight_once_in_the_ir():
    plan = _plan({"blocks.0.attn.proj": BlockMask(8, 8, 16, 16, KEEP)})
    graph = _graph(param_map={"w": "blocks.0.attn.proj.weight", "b": "blocks.0.attn.proj.bias"})
    out = AnnotatePruning(plan, graph)(_twice())

    def masked(bb, w):
        blocks = bb.emit(relax.op.reshape(w, (2, 8, 2, 8)))
        keep = relax.const(KEEP.astype(F32).reshape(2, 1, 2, 1))
        return bb.emit(relax.op.reshape(bb.emit(relax.op.multiply(blocks, keep)), (16, 16)))

    expected = _twice(masked)
    attr = {"method": "magnitude", "layers": {"blocks.0.attn.proj": "8x8 blocks, density 0.500"}}
    expected["main"] = expected["main"].with_attr(PRUNING_ATTR, attr)
    tvm.ir.assert_structural_equal(out, expected)


def test_annotate_pruning_rejects_a_plan_that_does_not_fit():
    graph = _graph(param_map={"w": "blocks.0.attn.proj.weight"})
    wide = _plan({"blocks.0.attn.proj": BlockMask(8, 8, 16, 32, np.ones((2, 4), bool))})
    with _plan_error(r"\(16, 32\) weight, the module's w is \(16, 16\)"):
        AnnotatePruning(wide, graph)(_twice())
    other = _plan({"blocks.0.mlp.fc1": BlockMask(8, 8, 16, 16, KEEP)})
    with _plan_error("has no weight"):
        AnnotatePruning(other, graph)(_twice())


def test_a_pass_raises_plan_error():
    tokens = Structure(blocks={0: BlockStructure(tokens=TokenKeep(2))})
    with pytest.raises(PlanError, match=r"cannot find the attention of block\(s\) \[0\]"):
        PruneTokens(tokens, _graph())(_mlp(16))  # no attention in it


# --- BlockSparsify and LowerLinear -------------------------------------------------------------

MASKS = {  # 8x8 blocks of fc1 (16, 8) and fc2 (8, 16)
    "blocks.0.mlp.fc1": BlockMask(8, 8, 16, 8, np.array([[1], [0]], bool)),
    "blocks.0.mlp.fc2": BlockMask(8, 8, 8, 16, np.array([[1, 1]], bool)),
}


def _masked_and_bound(fc2_bias=True):
    mod = _mlp(16, fc2_bias)
    graph = _graph(param_map={"w1": "blocks.0.mlp.fc1.weight", "w2": "blocks.0.mlp.fc2.weight"})
    params = _weights(mod)
    return BindWeights(params)(AnnotatePruning(_plan(MASKS), graph)(mod)), params


def test_block_sparsify_lowers_masked_layers_to_bsr_kernels():
    mod, params = _masked_and_bound()
    decisions = []
    out = BlockSparsify(lambda m, k, n, block: 1.0, decisions)(mod)
    ops = _ops(out)
    # fc1 + GELU: one kernel with the GELU epilogue; fc2 on a 3-d input: reshape, kernel, reshape.
    assert [op.split(":")[0] for op in ops] == ["reshape", "call_tir", "reshape"] * 2
    assert ops[1] == "call_tir:bsr_8x8_gelu" and ops[4].startswith("call_tir:bsr_8x8")
    shapes = [struct_shape(var) for _, var, _ in _calls(out)]
    assert shapes == [(4, 8), (4, 16), (1, 4, 16), (4, 16), (4, 8), (1, 4, 8)]
    kernels = {gv.name_hint: out[gv] for gv in out.get_global_vars() if gv.name_hint != "main"}
    assert sorted(kernels) == sorted(op.split(":")[1] for op in ops if ":" in op)  # DCE'd the rest
    work = sorted((s.m, s.k, s.n, s.nnzb, s.epilogue) for s in map(bsr.shape_of, kernels.values()))
    assert work == [(4, 8, 16, 1, "gelu"), (4, 16, 8, 2, "none")]
    for (data, indices, indptr, bias), mask, i in zip(
        _const_args(out, "call_tir"), MASKS.values(), (1, 2), strict=True
    ):
        packed = bsr.to_bsr(params[f"w{i}"], mask.kept, (8, 8))
        for got, want in ((data, packed.data), (indices, packed.indices), (indptr, packed.indptr)):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(bias, params[f"b{i}"])
    summary = [(d["shape"], d["block"], d["density"], d["kernel"]) for d in decisions]
    assert summary == [((4, 8, 16), (8, 8), 0.5, "bsr"), ((4, 16, 8), (8, 8), 1.0, "bsr")]


def test_block_sparsify_leaves_layers_above_break_even_masked():
    mod, _ = _masked_and_bound()
    decisions = []
    out = BlockSparsify(lambda m, k, n, block: 0.0, decisions)(mod)
    tvm.ir.assert_structural_equal(out, mod)
    assert [(d["break_even"], d["kernel"]) for d in decisions] == [(0.0, "dense")] * 2


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="BlockSparsify only matches add(matmul(x, W), b): a masked linear without bias "
    "(qkv_bias=False, which the frontend supports) stays dense and is missing from decisions",
)
def test_block_sparsify_lowers_a_masked_layer_without_bias():
    mod, _ = _masked_and_bound(fc2_bias=False)
    decisions = []
    out = BlockSparsify(lambda m, k, n, block: 1.0, decisions)(mod)
    assert len(decisions) == 2 and sum(op.startswith("call_tir:bsr") for op in _ops(out)) == 2


def test_lower_linear_packs_constant_weights_into_dense_kernels():
    mod = _mlp(16)
    params = _weights(mod)
    out = LowerLinear()(BindWeights(params)(mod))
    # fc1 + GELU: one packed kernel. fc2's 8 outputs do not fill a panel of 16: its weight and
    # bias are padded with zero rows to 16 and the output sliced back to 8.
    assert _ops(out) == [
        "reshape",
        "call_tir:dense_gelu",
        "reshape",
        "reshape",
        "call_tir:dense_none_padded",
        "strided_slice",
        "reshape",
    ]
    kernels = {gv.name_hint: out[gv] for gv in out.get_global_vars() if gv.name_hint != "main"}
    assert {name: dense.shape_of(k) for name, k in kernels.items()} == {
        "dense_gelu": dense.DenseShape(4, 8, 16, "gelu", dense.choose_row_tile(4)),
        "dense_none_padded": dense.DenseShape(4, 16, 16, "none", dense.choose_row_tile(4)),
    }
    assert int(kernels["dense_none_padded"].attrs["op_pattern"]) == 8  # the slice stays apart
    (w1, b1), (w2, b2) = _const_args(out, "call_tir")
    np.testing.assert_array_equal(w1, dense.pack_weight(params["w1"]))
    assert w1.shape == (1, 8, 16) and np.array_equal(b1, params["b1"])
    padded = np.concatenate([params["w2"], np.zeros((8, 16), np.float32)])
    np.testing.assert_array_equal(w2, dense.pack_weight(padded))
    assert np.array_equal(b2[:8], params["b2"]) and not b2[8:].any()


# --- PatchEmbedToDense -------------------------------------------------------------------------


def test_patch_embed_to_dense_rewrites_the_patch_conv_as_a_linear():
    w = np.random.default_rng(2).standard_normal((4, 3, 4, 4), F32)

    def conv(padding):
        return _module(
            {"x": (1, 3, 8, 8)},
            lambda bb, p: relax.op.nn.conv2d(p["x"], relax.const(w), strides=4, padding=padding),
        )

    def patches(bb, p):
        x = bb.emit(relax.op.reshape(p["x"], (1, 3, 2, 4, 2, 4)))
        x = bb.emit(
            relax.op.reshape(bb.emit(relax.op.permute_dims(x, [0, 2, 4, 1, 3, 5])), (4, 48))
        )
        wt = bb.emit(relax.op.permute_dims(relax.const(w.reshape(4, 48)), [1, 0]))
        y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, wt)), relax.const(np.zeros(4, F32))))
        return relax.op.permute_dims(bb.emit(relax.op.reshape(y, (1, 2, 2, 4))), [0, 3, 1, 2])

    tvm.ir.assert_structural_equal(
        PatchEmbedToDense()(conv(0)), _module({"x": (1, 3, 8, 8)}, patches)
    )
    padded = conv(1)  # overlapping windows: not a patch embedding, left alone
    tvm.ir.assert_structural_equal(PatchEmbedToDense()(padded), padded)
