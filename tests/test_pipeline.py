"""The dense compile path: passes (structure), kernels and whole models (numbers vs PyTorch)."""

import numpy as np
import pytest
import torch

from vitsparse._tvm import Schedule, Target, relax, tir, tvm
from vitsparse.frontend import import_model
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.compile import compile_model
from vitsparse.passes import pipeline
from vitsparse.schedules import dense
from vitsparse.targets import resolve_target

TARGET = Target({"kind": "llvm"})


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _rewritten(model, batch=1):
    imported = import_model(model, batch=batch)
    mod = pipeline.bind_params(imported.mod, imported.params)
    config = pipeline.PipelineConfig(target=TARGET)
    return imported, pipeline.optimize(mod, config, stop_before="legalize")


def _calls(mod, prefix):
    names = []

    def visit(node):
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op):
            if node.op.name == "relax.call_tir" and node.args[0].name_hint.startswith(prefix):
                names.append(node.args[0].name_hint)
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op):
            if node.op.name.startswith("relax.nn.conv2d") or node.op.name == "relax.matmul":
                names.append(node.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return names


def test_rewrite_turns_every_linear_layer_into_a_dense_kernel():
    depth = 3
    _, mod = _rewritten(tiny_vit(depth=depth, embed_dim=64, num_classes=16))
    calls = _calls(mod, "dense_")
    # patch embedding + 4 per block + head; fc1 carries the GELU epilogue.
    assert calls.count("relax.nn.conv2d") == 0
    assert sum(c.startswith("dense_gelu") for c in calls) == depth
    assert sum(c.startswith("dense_none") for c in calls) == 1 + 3 * depth + 1
    # Only attention's two batched matmuls remain as Relax matmuls.
    assert calls.count("relax.matmul") == 2 * depth


def test_layer_whose_width_is_not_a_panel_multiple_is_padded_to_one():
    _, mod = _rewritten(tiny_vit(depth=2, num_classes=10))  # head: 10 outputs
    calls = _calls(mod, "dense_")
    assert calls.count("relax.matmul") == 2 * 2  # the attention matmuls only
    assert calls.count("dense_none_padded") == 1  # the head, padded to 16 and sliced


@pytest.mark.parametrize(
    ("m", "k", "n", "epilogue", "knobs"),
    [
        (197, 64, 96, "none", dense.DenseKnobs(2, 4)),
        (197, 48, 64, "gelu", dense.DenseKnobs(4, 1)),
        (5, 32, 16, "none", None),
        (64, 40, 32, "gelu", dense.DenseKnobs(1, 8)),
    ],
)
def test_dense_kernel_matches_numpy(m, k, n, epilogue, knobs):
    shape = dense.DenseShape(m, k, n, epilogue, dense.choose_row_tile(m))
    sch = Schedule(dense.dense_primfunc(shape).with_attr("global_symbol", "main"))
    dense.schedule_dense_cpu(sch, knobs or dense.default_knobs(shape))
    lib = tvm.compile(sch.mod, target=TARGET)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    args = [tvm.runtime.tensor(a) for a in (x, dense.pack_weight(w), b)]
    lib["main"](*args, y)
    ref = torch.nn.functional.linear(*map(torch.from_numpy, (x, w, b)))
    if epilogue == "gelu":
        ref = torch.nn.functional.gelu(ref)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-4)


def test_dense_shape_rejects_unpacked_width():
    with pytest.raises(ValueError, match="multiple of the packing panel"):
        dense.DenseShape(4, 8, 10)


@pytest.mark.parametrize(
    ("depth", "embed_dim", "heads", "batch", "classes"),
    [(2, 64, 4, 1, 10), (3, 96, 3, 2, 16), (4, 32, 2, 1, 32)],
)
def test_compiled_small_vit_matches_pytorch(depth, embed_dim, heads, batch, classes):
    model = tiny_vit(depth=depth, embed_dim=embed_dim, num_heads=heads, num_classes=classes)
    compiled = compile_model(model, target="x86", batch=batch)
    x = np.random.default_rng(1).standard_normal(compiled.input_shape, dtype=np.float32)
    np.testing.assert_allclose(compiled.run(x), _torch_out(model, x), rtol=0, atol=1e-4)


def test_compiled_deit_tiny_matches_pytorch():
    compiled = compile_model("deit_tiny_patch16_224", target="x86")
    x = np.random.default_rng(2).standard_normal(compiled.input_shape, dtype=np.float32)
    out = compiled.run(x)
    assert out.shape == (1, 1000)
    err = np.abs(out - _torch_out(compiled.imported.torch_model, x)).max()
    assert err <= 1e-4, err


def test_every_kernel_is_scheduled():
    imported = import_model(tiny_vit(depth=2))
    mod = pipeline.bind_params(imported.mod, imported.params)
    config = pipeline.PipelineConfig(target=Target({"kind": "llvm", "num-cores": 2}))
    out = pipeline.optimize(mod, config)
    unscheduled = [
        gv.name_hint
        for gv, f in out.functions.items()
        if isinstance(f, tir.PrimFunc) and not f.attrs.get("tirx.is_scheduled", False)
    ]
    assert unscheduled == []


def test_dump_dir_writes_each_phase(tmp_path):
    compile_model(tiny_vit(depth=2), target="x86", dump_dir=tmp_path)
    for phase in pipeline.PHASES:
        assert (tmp_path / f"{phase}.py").stat().st_size > 0


def test_rewrite_passes_leave_their_input_alone():
    from vitsparse.passes.lower_linear import LowerLinear
    from vitsparse.passes.patch_embed_to_dense import PatchEmbedToDense

    imported = import_model(tiny_vit(depth=2))
    mod = pipeline.bind_params(imported.mod, imported.params)
    before = mod.script(show_meta=False)
    out = LowerLinear()(PatchEmbedToDense()(mod))
    assert mod.script(show_meta=False) == before
    assert "relax.nn.conv2d" not in str(_calls(out, "dense_"))


ZOO = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_small_distilled_patch16_224",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_small_patch16_384",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_compiled_zoo_matches_pytorch(name):
    compiled = compile_model(name, target="x86", batch=2)
    x = np.random.default_rng(3).standard_normal(compiled.input_shape, dtype=np.float32)
    err = np.abs(compiled.run(x) - _torch_out(compiled.imported.torch_model, x)).max()
    assert err <= 1e-4, err


def test_the_pipeline_is_registered_with_tvm():
    model = tiny_vit(depth=1)
    imported = import_model(model)
    target = resolve_target("x86").target
    pipeline_pass = relax.get_pipeline("vitsparse", params=imported.params)
    executable = tvm.compile(imported.mod, target, relax_pipeline=pipeline_pass)
    x = np.random.default_rng(5).standard_normal(imported.input_shape, dtype=np.float32)
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, _torch_out(model, x), rtol=0, atol=1e-4)
