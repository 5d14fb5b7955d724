"""AnnotatePruning and BlockSparsify: the plan in the IR, BSR lowering, and numbers vs PyTorch
running the same pruned weights."""

import numpy as np
import pytest
import torch

from vitsparse._tvm import relax, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import import_model
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.compile import compile_model
from vitsparse.passes import pipeline
from vitsparse.passes.annotate_pruning import PRUNING_ATTR, AnnotatePruning
from vitsparse.passes.block_sparsify import BlockSparsify
from vitsparse.plan import PruningPlan, apply_plan_to_torch
from vitsparse.pruning import block_mask_plan


def _ops(mod, name):
    found = []

    def visit(node):
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op):
            if node.op.name == name:
                found.append(node)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _tir_calls(mod, prefix):
    return [c for c in _ops(mod, "relax.call_tir") if c.args[0].name_hint.startswith(prefix)]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    plan = block_mask_plan(model, model_id="tiny", block=(16, 16), keep=0.5, method="random")
    return model, plan, import_model(model)


def test_annotation_is_in_the_ir(tiny):
    _, plan, imported = tiny
    mod = AnnotatePruning(plan, imported.graph)(imported.mod)
    before = len(_ops(imported.mod, "relax.multiply"))  # attention's scaling
    assert len(_ops(mod, "relax.multiply")) == before + len(plan.layers)
    attr = mod["main"].attrs[PRUNING_ATTR]
    assert set(attr["layers"]) == set(plan.layers)
    assert "16x16 blocks" in str(attr["layers"]["blocks.0.attn.qkv"])
    assert PRUNING_ATTR not in (imported.mod["main"].attrs or {})  # input module untouched


def test_block_sparsify_lowers_layers_below_break_even(tiny):
    _, plan, imported = tiny
    mod = pipeline.bind_params(AnnotatePruning(plan, imported.graph)(imported.mod), imported.params)
    decisions = []
    out = BlockSparsify(lambda m, k, n, block: 0.9, decisions)(mod)
    assert len(_tir_calls(out, "bsr_16x16")) == len(plan.layers)
    # Each MLP's first layer carries its GELU as the kernel epilogue.
    assert len(_tir_calls(out, "bsr_16x16_gelu")) == 2 and _ops(out, "relax.nn.gelu") == []
    assert {d["kernel"] for d in decisions} == {"bsr"}
    assert all(d["density"] == pytest.approx(0.5, abs=0.1) for d in decisions)


def test_layers_above_break_even_stay_dense_and_masked(tiny):
    model, plan, imported = tiny
    mod = pipeline.bind_params(AnnotatePruning(plan, imported.graph)(imported.mod), imported.params)
    decisions = []
    out = BlockSparsify(lambda m, k, n, block: 0.1, decisions)(mod)
    assert _tir_calls(out, "bsr") == []
    assert {d["kernel"] for d in decisions} == {"dense"}
    config = pipeline.PipelineConfig(target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(pipeline.build(out, config), tvm.cpu())
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    with torch.no_grad():
        ref = apply_plan_to_torch(model, plan)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("block", "keep", "batch"), [((16, 16), 0.5, 1), ((32, 16), 0.3, 2)])
def test_compiled_pruned_tiny_vit_matches_pruned_pytorch(block, keep, batch):
    model = tiny_vit(depth=3, embed_dim=64, num_heads=4)
    plan = block_mask_plan(model, model_id="tiny", block=block, keep=keep, method="magnitude")
    compiled = compile_model(model, target="x86", batch=batch, plan=plan)
    assert {d["kernel"] for d in compiled.sparsity_decisions} <= {"bsr", "dense"}
    assert len(compiled.sparsity_decisions) == len(plan.layers)
    x = np.random.default_rng(1).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        ref = apply_plan_to_torch(model, plan)(torch.from_numpy(x)).numpy()
        dense = model(torch.from_numpy(x)).numpy()
    got = compiled.run(x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    assert np.abs(got - dense).max() > 1e-2  # the pruning really happened


def test_compiled_pruned_deit_tiny_matches_pruned_pytorch():
    from vitsparse.frontend import load_torch_model

    model, model_id = load_torch_model("deit_tiny_patch16_224")
    plan = block_mask_plan(model, model_id=model_id, block=(32, 32), keep=0.5, method="magnitude")
    compiled = compile_model(model, target="x86", plan=plan)
    assert {d["kernel"] for d in compiled.sparsity_decisions} == {"bsr"}  # 50% < break-even
    x = np.random.default_rng(2).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        ref = apply_plan_to_torch(model, plan)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(compiled.run(x), ref, rtol=0, atol=1e-4)


def test_plan_for_other_weights_is_rejected(tiny):
    model, plan, _ = tiny
    other = tiny_vit(depth=2, embed_dim=64, num_heads=4, seed=7)
    with pytest.raises(PlanError):
        compile_model(other, target="x86", plan=plan)
    del model


def test_plan_file_is_read(tmp_path, tiny):
    model, plan, _ = tiny
    path = plan.save(tmp_path / "plan.json")
    compiled = compile_model(model, target="x86", plan=path)
    assert isinstance(compiled.plan, PruningPlan)


def test_pruned_model_cross_compiles_for_arm(tmp_path, tiny):
    import shutil
    import subprocess

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (scripts/install_system_deps.sh installs it)")
    model, plan, _ = tiny
    compiled = compile_model(model, target="arm", plan=plan)
    # No ARM machine here to measure a break-even on: every masked layer gets the BSR kernel.
    assert {d["kernel"] for d in compiled.sparsity_decisions} == {"bsr"}
    out = compiled.export(tmp_path / "arm")
    described = subprocess.run(["file", str(out / "model.so")], capture_output=True, text=True)
    assert "aarch64" in described.stdout


def test_pruned_model_builds_for_cuda_with_nvcc(tmp_path, tiny):
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc missing: the CUDA toolkit is not installed on this machine")
    model, plan, _ = tiny
    compiled = compile_model(model, target="cuda", cuda_arch="sm_80", plan=plan)
    # No GPU here to measure a break-even on: every masked layer gets the BSR kernel.
    assert {d["kernel"] for d in compiled.sparsity_decisions} == {"bsr"}
    out = compiled.export(tmp_path / "cuda")  # nvcc compiles the kernels into the library
    assert (out / "model.so").stat().st_size > 0
