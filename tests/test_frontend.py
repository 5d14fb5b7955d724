"""Frontend: loading, importing (PyTorch and ONNX) and reading the ViT geometry."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import helper, numpy_helper

from vitsparse._tvm import relax, tvm
from vitsparse.errors import ModelError, NotAViTError, UnsupportedOpError
from vitsparse.frontend import BlockInfo, ImportedModel, ViTGraph, import_model, load_torch_model
from vitsparse.frontend.extract import extract_vit_graph
from vitsparse.frontend.onnx_prep import canonicalize_onnx
from vitsparse.frontend.testing import tiny_vit

TINY = {"img_size": 32, "patch_size": 8}


def _geometry(graph: ViTGraph) -> dict:
    """Everything in a ViTGraph except names (which differ between PyTorch and ONNX)."""
    data = graph.to_json()
    blocks = [
        {k: b[k] for k in ("index", "embed_dim", "num_heads", "head_dim", "mlp_dim")}
        for b in data.pop("blocks")
    ]
    data.pop("param_map")
    data.pop("model_id")
    return {**data, "blocks": blocks}


def _run_relax(imported: ImportedModel, x: np.ndarray) -> np.ndarray:
    executable = tvm.compile(imported.mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(p) for p in imported.params.values()]
    return vm["main"](*args).numpy()


# --- geometry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, embed_dim, num_heads, mlp_ratio",
    [(2, 64, 4, 2.0), (3, 48, 3, 4.0), (4, 32, 2, 1.5)],
)
def test_tiny_vit_graph(depth, embed_dim, num_heads, mlp_ratio):
    model = tiny_vit(depth=depth, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
    graph = import_model(model).graph
    mlp_dim = int(embed_dim * mlp_ratio)
    assert graph.model_id == "VisionTransformer"
    assert len(graph.blocks) == depth
    assert (graph.embed_dim, graph.num_heads, graph.patch_size) == (embed_dim, num_heads, 8)
    assert graph.image_size == (32, 32)
    assert (graph.num_patches, graph.num_prefix_tokens, graph.num_tokens) == (16, 1, 17)
    assert graph.num_classes == 10
    for i, block in enumerate(graph.blocks):
        assert block == BlockInfo(
            index=i,
            qkv_weight=f"p_blocks_{i}_attn_qkv_weight",
            qkv_bias=f"p_blocks_{i}_attn_qkv_bias",
            proj_weight=f"p_blocks_{i}_attn_proj_weight",
            proj_bias=f"p_blocks_{i}_attn_proj_bias",
            fc1_weight=f"p_blocks_{i}_mlp_fc1_weight",
            fc1_bias=f"p_blocks_{i}_mlp_fc1_bias",
            fc2_weight=f"p_blocks_{i}_mlp_fc2_weight",
            fc2_bias=f"p_blocks_{i}_mlp_fc2_bias",
            embed_dim=embed_dim,
            num_heads=num_heads,
            head_dim=embed_dim // num_heads,
            mlp_dim=mlp_dim,
        )


def test_deit_tiny_graph():
    imported = import_model("deit_tiny_patch16_224")
    graph = imported.graph
    assert imported.model_id == graph.model_id == "deit_tiny_patch16_224"
    assert imported.input_shape == (1, 3, 224, 224)
    assert len(graph.blocks) == 12
    assert (graph.embed_dim, graph.num_heads, graph.patch_size) == (192, 3, 16)
    assert {(b.num_heads, b.head_dim, b.mlp_dim) for b in graph.blocks} == {(3, 64, 768)}
    assert (graph.num_patches, graph.num_prefix_tokens, graph.num_tokens) == (196, 1, 197)
    assert graph.num_classes == 1000
    assert "deit_tiny_patch16_224: 12 blocks" in graph.summary()


def test_distilled_vit_has_two_prefix_tokens():
    graph = import_model(tiny_vit(distilled=True, num_classes=7)).graph
    assert graph.model_id == "VisionTransformerDistilled"
    assert (graph.num_patches, graph.num_prefix_tokens, graph.num_tokens) == (16, 2, 18)
    assert graph.num_classes == 7
    assert len(graph.blocks) == 2


def test_vit_graph_json_round_trip():
    graph = import_model(tiny_vit(depth=2)).graph
    assert ViTGraph.from_json(graph.to_json()) == graph


# --- weights and batch --------------------------------------------------------------------------


def test_param_map_points_at_the_torch_weights():
    model = tiny_vit(depth=2)
    imported = import_model(model)
    state = model.state_dict()
    func = imported.mod["main"]
    assert [p.name for p in func.params[1:]] == list(imported.params)
    assert set(imported.graph.param_map) == set(imported.params)
    for name, array in imported.params.items():
        torch_name = imported.graph.param_map[name]
        np.testing.assert_array_equal(array, state[torch_name].numpy(), err_msg=name)
    block = imported.graph.blocks[1]
    assert imported.graph.param_map[block.fc1_weight] == "blocks.1.mlp.fc1.weight"
    assert imported.graph.param_map[block.proj_bias] == "blocks.1.attn.proj.bias"


def test_batch_2_imports_and_runs_like_torch():
    model = tiny_vit(depth=2, distilled=True)
    imported = import_model(model, batch=2)
    assert imported.input_shape == (2, 3, 32, 32)
    assert imported.torch_model is model and imported.onnx_path is None
    assert tuple(v for v in imported.mod["main"].params[0].ty.shape.values) == (2, 3, 32, 32)
    # torch.export turns the batch-2 attention projection into a bmm with a broadcast weight;
    # the importer restores matmul(x, permute_dims(W)).
    assert "broadcast_to(R.permute_dims" not in imported.mod.script(show_meta=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run_relax(imported, x), expected, rtol=1e-4, atol=1e-5)


def test_the_softmax_guard_of_attention_is_dropped_and_only_it():
    """torch.export's attention guards each softmax against a row of all -inf scores
    (``where(not any(s != -inf), 0, softmax(s))``); a ViT has no mask, so the importer drops
    it, and the model still runs like PyTorch. A guard with another fill value stays."""
    from vitsparse.frontend.canonicalize import drop_softmax_guards

    model = tiny_vit(depth=2)
    imported = import_model(model)
    script = imported.mod.script(show_meta=False)
    assert script.count("R.nn.softmax") == 2
    assert "R.where" not in script and "R.equal" not in script and "full_like" not in script
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run_relax(imported, x), expected, rtol=1e-4, atol=1e-5)

    bb = relax.BlockBuilder()
    s = relax.Var("s", relax.TensorType((2, 5), "float32"))
    with bb.function("main", [s]):
        with bb.dataflow():
            soft = bb.emit(relax.op.nn.softmax(s, axis=-1))
            finite = bb.emit(relax.op.logical_not(relax.op.equal(s, relax.const(-np.inf))))
            row = bb.emit(relax.op.max(relax.op.astype(finite, "int8"), axis=[-1], keepdims=True))
            masked = bb.emit(relax.op.logical_not(relax.op.astype(row, "bool")))
            fill = bb.emit(relax.op.full_like(soft, relax.const(np.float32(0.5))))
            out = bb.emit_output(relax.op.where(masked, fill, soft))
        bb.emit_func_output(out)
    kept = drop_softmax_guards(bb.get())
    assert "R.where" in kept.script(show_meta=False)  # fills 0.5, not 0: not the guard


# --- ONNX ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_vit(tmp_path_factory):
    """A tiny distilled ViT exported with a dynamic batch axis, and its torch model."""
    model = tiny_vit(depth=3, distilled=True)
    path = tmp_path_factory.mktemp("onnx") / "tiny_vit.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 32, 32),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
    )
    return model, path


def test_onnx_file_runs_like_torch(onnx_vit):
    model, path = onnx_vit
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_onnx_import_matches_torch_geometry_and_weights(onnx_vit):
    model, path = onnx_vit
    from_onnx = import_model(path, batch=2)
    from_torch = import_model(model, batch=2)
    assert from_onnx.model_id == "tiny_vit" and from_onnx.onnx_path == path
    assert from_onnx.torch_model is None
    assert from_onnx.input_shape == (2, 3, 32, 32)
    assert _geometry(from_onnx.graph) == _geometry(from_torch.graph)
    # The blocks' linear weights carry timm's names (block-mask plans name them so); nothing
    # else is known of an ONNX file's weights.
    named = {k: v for k, v in from_onnx.graph.param_map.items() if v}
    assert named == {
        w: f"blocks.{b.index}.{layer}.weight"
        for b in from_onnx.graph.blocks
        for layer, w in zip(
            ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), b.weight_names(), strict=True
        )
    }
    assert all(p.dtype == np.float32 for p in from_onnx.params.values())
    # Linear weights come back in torch's (out, in) layout, one tensor per layer.
    state = model.state_dict()
    for block in from_onnx.graph.blocks:
        prefix = f"blocks.{block.index}."
        pairs = {
            block.qkv_weight: "attn.qkv.weight",
            block.qkv_bias: "attn.qkv.bias",
            block.proj_weight: "attn.proj.weight",
            block.fc1_weight: "mlp.fc1.weight",
            block.fc2_weight: "mlp.fc2.weight",
            block.fc2_bias: "mlp.fc2.bias",
        }
        for relax_name, torch_name in pairs.items():
            np.testing.assert_array_equal(
                from_onnx.params[relax_name], state[prefix + torch_name].numpy()
            )


def test_onnx_import_runs_like_torch(onnx_vit):
    model, path = onnx_vit
    imported = import_model(path, batch=2)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run_relax(imported, x), expected, rtol=1e-4, atol=1e-5)


def test_canonicalize_onnx_unshares_and_transposes():
    """Exporters share equal initializers and store MatMul weights (in, out); both are undone."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6), dtype=np.float32)
    b = rng.standard_normal((6,), dtype=np.float32)
    g = rng.standard_normal((6, 5), dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"]),
        helper.make_node("Add", ["h1", "b"], ["a1"]),
        helper.make_node("MatMul", ["x", "w"], ["h2"]),  # same weight and bias again
        helper.make_node("Add", ["b", "h2"], ["a2"]),
        helper.make_node("Add", ["a1", "a2"], ["s"]),
        helper.make_node("Gemm", ["s", "g"], ["y"]),  # transB = 0
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (g, "g"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    fixed = canonicalize_onnx(model)
    onnx.checker.check_model(fixed)
    weights = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    assert len(weights) == 5  # w, b, their copies, g
    assert sorted(a.shape for a in weights.values() if a.ndim == 2) == [(5, 6), (6, 4), (6, 4)]
    assert sum(n.op_type == "Transpose" for n in fixed.graph.node) == 2
    x = rng.standard_normal((3, 4), dtype=np.float32)

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    np.testing.assert_allclose(run(fixed), run(model), rtol=1e-6)
    assert model.graph.node[0].input[1] == "w"  # the input model is left alone


def test_onnx_fixed_batch_mismatch(tmp_path):
    model = tiny_vit(depth=1)
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    assert import_model(path).input_shape == (1, 3, 32, 32)  # legacy exporter works too
    with pytest.raises(ModelError, match="fixed batch of 1"):
        import_model(path, batch=4)


# --- loading ------------------------------------------------------------------------------------


def test_tiny_vit_is_deterministic():
    a, b, c = tiny_vit(seed=0), tiny_vit(seed=0), tiny_vit(seed=1)
    assert not a.training
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_random_timm_weights_are_the_same_in_every_process():
    """A timm name without a checkpoint gets weights from a fixed seed: a plan made in one
    process (it carries the weights' hash) must match the model another process loads; and
    loading does not move the caller's random state."""
    import subprocess
    import sys

    from vitsparse.plan import weights_hash

    code = (
        "import torch; torch.manual_seed(123); "
        "from vitsparse.frontend import load_torch_model; from vitsparse.plan import weights_hash; "
        "print(weights_hash(load_torch_model('deit_tiny_patch16_224')[0]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    before = torch.random.get_rng_state()
    here = weights_hash(load_torch_model("deit_tiny_patch16_224")[0])
    assert torch.equal(torch.random.get_rng_state(), before)
    assert here == other


def test_the_weights_seed_picks_the_random_weights_and_plans_record_it():
    """--weights-seed N: other seeds give other weights; plans made from them carry the seed,
    and applying one to the weights of another seed names the seed to load."""
    from vitsparse.errors import PlanError
    from vitsparse.plan import apply_plan_to_torch, weights_hash
    from vitsparse.pruning.block_mask import block_mask_plan

    model0, model_id = load_torch_model("deit_tiny_patch16_224")
    model1, _ = load_torch_model("deit_tiny_patch16_224", seed=1)
    assert weights_hash(model0) != weights_hash(model1)
    plan = block_mask_plan(model1, model_id=model_id, block=(32, 32), keep=0.5)
    assert plan.weights_seed == 1 and plan.to_json()["weights_seed"] == 1
    with pytest.raises(PlanError, match="random weights of seed 1: load the model with --weig"):
        apply_plan_to_torch(model0, plan)


def test_checkpoint_loads_nested_state_dict(tmp_path):
    source = tiny_vit(seed=5)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    model, model_id = load_torch_model(tiny_vit(seed=0), checkpoint=path)
    assert model_id == "VisionTransformer" and not model.training
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_unknown_timm_name_suggests_close_matches():
    with pytest.raises(ModelError, match="deit_tinyy") as info:
        import_model("deit_tinyy")
    assert "deit_tiny_patch16_224" in str(info.value)


def test_resnet_is_not_a_vit():
    with pytest.raises(NotAViTError, match="resnet18.*no attention block"):
        import_model("resnet18")


def test_conv_stack_is_not_a_vit():
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    with pytest.raises(NotAViTError, match="'Sequential'.*no linear layers"):
        import_model(convs)


def test_head_count_cross_checked_against_torch():
    model = tiny_vit(depth=2)
    imported = import_model(model)
    model.blocks[1].attn.num_heads = 8
    with pytest.raises(NotAViTError, match="block 1 reshapes qkv into 4 heads.*num_heads=8"):
        extract_vit_graph(
            imported.mod,
            model_id="tiny",
            param_map=imported.graph.param_map,
            torch_model=model,
        )


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="nope.pth.*does not exist"):
        import_model(tiny_vit(), checkpoint=path)


def test_unreadable_checkpoint_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pth.*could not be read"):
        load_torch_model(tiny_vit(), checkpoint=path)


def test_checkpoint_with_wrong_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ModelError, match=r"other.pth.*does not match.*missing key.*fc\.weight"):
        import_model(tiny_vit(), checkpoint=path)


def test_checkpoint_with_wrong_shapes(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(tiny_vit(embed_dim=32, num_heads=2).state_dict(), path)
    with pytest.raises(ModelError, match="wide.pth.*wrong shape"):
        load_torch_model(tiny_vit(), checkpoint=path)


def test_missing_onnx_file(tmp_path):
    path = tmp_path / "missing.onnx"
    with pytest.raises(ModelError, match="missing.onnx.*does not exist"):
        import_model(str(path))


def test_pretrained_weights_unavailable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ModelError, match="deit_tiny_patch16_224.*could not be fetched.*--checkpoint"
    ):
        load_torch_model("deit_tiny_patch16_224", pretrained=True)


def test_unsupported_torch_op():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.i0e(x)

    with pytest.raises(UnsupportedOpError, match="'Odd'.*special_i0e"):
        import_model(Odd())


def test_unsupported_onnx_op(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(UnsupportedOpError, match="'odd'.*NoSuchOp"):
        import_model(path)


# --- the real model zoo -------------------------------------------------------------------------

ZOO = {
    # name: (depth, embed, heads, mlp, image, tokens, prefix tokens)
    "deit_tiny_patch16_224": (12, 192, 3, 768, 224, 197, 1),
    "deit_small_patch16_224": (12, 384, 6, 1536, 224, 197, 1),
    "deit_base_patch16_224": (12, 768, 12, 3072, 224, 197, 1),
    "vit_tiny_patch16_224": (12, 192, 3, 768, 224, 197, 1),
    "vit_small_patch16_224": (12, 384, 6, 1536, 224, 197, 1),
    "vit_base_patch16_224": (12, 768, 12, 3072, 224, 197, 1),
    "deit_small_distilled_patch16_224": (12, 384, 6, 1536, 224, 198, 2),
    "vit_small_patch16_384": (12, 384, 6, 1536, 384, 577, 1),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_timm_zoo(name):
    depth, embed, heads, mlp, image, tokens, prefix = ZOO[name]
    graph = import_model(name, batch=2).graph
    assert timm.is_model(name)
    assert len(graph.blocks) == depth
    assert (graph.embed_dim, graph.num_heads, graph.image_size) == (embed, heads, (image, image))
    assert {(b.num_heads * b.head_dim, b.mlp_dim) for b in graph.blocks} == {(embed, mlp)}
    assert (graph.num_tokens, graph.num_prefix_tokens, graph.num_classes) == (tokens, prefix, 1000)
