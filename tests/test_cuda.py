"""CUDA: deit_tiny and deit_small, dense and block-sparse, compile for sm_80 and sm_90 here (nvcc
builds the device code into the library); on a machine with a GPU they run, match PyTorch, and
bench times PyTorch eager on the same GPU (`gpu` marker; skipped without one)."""

import json
import shutil

import numpy as np
import pytest
import torch
from _compiled import (
    assert_int8_exact_but_for_ties,
    assert_within_reference_noise,
    mlp_blocks_plan,
)

from vitsparse._tvm import tvm
from vitsparse.frontend import import_model, load_torch_model
from vitsparse.jobs._inputs import resolve_inputs
from vitsparse.jobs.compile import compile_model, graph_on_host, quantization_for
from vitsparse.plan import apply_plan_to_torch
from vitsparse.pruning.block_mask import block_mask_plan
from vitsparse.targets import cuda_source

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc missing: the CUDA toolkit is not installed here"
)


def _model_and_plan(name: str, pruned: bool):
    model, model_id = load_torch_model(name)
    plan = block_mask_plan(model, model_id=model_id, block=(32, 32), keep=0.5) if pruned else None
    return model, plan


def _compile_and_export(tmp_path, name, arch, pruned):
    model, plan = _model_and_plan(name, pruned)
    compiled = compile_model(model, target="cuda", cuda_arch=arch, plan=plan)
    if pruned:  # no GPU here to measure a break-even on: every masked layer is BSR
        assert {d["kernel"] for d in compiled.sparsity_decisions} == {"bsr"}
    out = compiled.export(tmp_path / f"{name}_{arch}")
    library = (out / "model.so").read_bytes()
    assert f"{arch}".encode() in library  # nvcc's cubin/fatbin for this arch is in the library
    return model, plan, compiled


# deit_small compiles the same kernels at other sizes (about 12 s each): in the slow set
@pytest.mark.parametrize(
    "name",
    ["deit_tiny_patch16_224", pytest.param("deit_small_patch16_224", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "bsr"])
def test_deit_compiles_for_cuda(tmp_path, name, arch, pruned):
    _compile_and_export(tmp_path, name, arch, pruned)


def _gpu_arch() -> str:
    if not tvm.cuda(0).exist or not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "bsr"])
def test_deit_runs_on_the_gpu_and_matches_pytorch(name, pruned):
    arch = _gpu_arch()
    model, plan = _model_and_plan(name, pruned)
    compiled = compile_model(model, target="cuda", cuda_arch=arch, plan=plan)
    x = np.random.default_rng(5).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        expect = (apply_plan_to_torch(model, plan) if pruned else model)(torch.from_numpy(x))
    np.testing.assert_allclose(compiled.run(x), expect.numpy(), rtol=0, atol=1e-3)


@pytest.mark.gpu
def test_bench_times_pytorch_on_the_same_gpu():
    from vitsparse.jobs.bench import bench

    arch = _gpu_arch()
    report = bench(
        "deit_tiny_patch16_224",
        target="cuda",
        cuda_arch=arch,
        include=("torch-eager", "tvm-dense"),
        repeat=3,
        number=2,
        progress=None,
    )
    torch_row, tvm_row = report.row("torch-eager"), report.row("tvm-dense")
    assert torch_row.device == tvm_row.device == "cuda"
    assert "cuBLAS" in torch_row.detail
    assert tvm_row.max_abs_err_vs_torch < 1e-3
    assert "tvm-dense vs torch-eager" in report.speedup


_FRAGMENTS = {  # the tensor-core fragments of each precision's matmuls (A, B; accumulator)
    "fp16": ("matrix_a, 16, 16, 16, half", "matrix_b, 16, 16, 16, half", "16, 16, 16, float>"),
    "int8": (
        "matrix_a, 16, 16, 16, signed char",
        "matrix_b, 16, 16, 16, signed char",
        "16, 16, 16, int>",
    ),
}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_deit_tiny_compiles_to_the_tensor_cores_in_reduced_precision(tmp_path, precision):
    """--precision fp16 / int8 --target cuda: the blocks' linear layers are fp16 (fp32 sums)
    or int8 (int32 sums) matmuls on the tensor cores (wmma fragments of that type), nvcc builds
    them, and the artifact records the precision."""
    compiled = compile_model(
        "deit_tiny_patch16_224",
        target="cuda",
        cuda_arch="sm_80",
        precision=precision,
        calib="synthetic",
        calib_size=4,
    )
    assert compiled.precision == precision and compiled.spec.key == f"cuda-sm_80-{precision}"
    source = cuda_source(compiled.executable)
    assert "wmma::mma_sync" in source
    for fragment in _FRAGMENTS[precision]:
        assert fragment in source, fragment
    out = compiled.export(tmp_path / precision)
    assert json.loads((out / "manifest.json").read_text())["precision"] == precision
    assert b"sm_80" in (out / "model.so").read_bytes()


def _assert_matches_the_reduced_reference(output, base, precision, images, quantization):
    if precision == "fp16":
        assert_within_reference_noise(output, base, "fp16", images)
    else:
        assert_int8_exact_but_for_ties(output, base, quantization, images, exact=3)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_the_cuda_reduced_precision_graph_matches_its_reference(precision):
    """The digits ViT with half its MLP blocks pruned, in fp16 or int8 for CUDA: the graph the
    GPU kernels compute (qkv and proj typed matmuls, fc1 and fc2 BSR kernels in the precision)
    run on this CPU matches the PyTorch model of that computation; and it compiles with nvcc."""
    from vitsparse.data.sources import load_images

    model, model_id = load_torch_model("vitsparse/digits_vit")
    plan = mlp_blocks_plan(model, model_id)
    images = load_images("digits", image_size=model.patch_embed.img_size[0], limit=4).images
    inputs = resolve_inputs(
        target="cuda", cuda_arch="sm_80", plan=plan, precision=precision, calib="digits-train"
    )
    imported = import_model(model, batch=len(images))
    quantization = quantization_for(imported, inputs)
    executable, config = graph_on_host(imported, inputs, quantization)
    decisions = {(d["kernel"], d.get("precision")) for d in config.decisions}
    assert decisions == {("bsr", precision)} and len(config.decisions) == 2 * len(model.blocks)
    vm = tvm.runtime.vm.VirtualMachine(executable, tvm.cpu())
    output = vm["main"](tvm.runtime.tensor(images.numpy())).numpy()
    base = apply_plan_to_torch(model, plan)
    _assert_matches_the_reduced_reference(output, base, precision, images, quantization)
    compiled = compile_model(
        model,
        target="cuda",
        cuda_arch="sm_80",
        plan=plan,
        precision=precision,
        calib="digits-train",
    )
    source = cuda_source(compiled.executable)
    assert ("signed char" if precision == "int8" else "half") in source


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_runs_on_the_gpu_and_matches_its_reference(precision):
    """The same digits ViT, dense qkv/proj and BSR MLP layers in fp16 or int8, run on the GPU."""
    from vitsparse.data.sources import load_images

    arch = _gpu_arch()
    model, model_id = load_torch_model("vitsparse/digits_vit")
    plan = mlp_blocks_plan(model, model_id)
    images = load_images("digits", image_size=model.patch_embed.img_size[0], limit=4).images
    compiled = compile_model(
        model,
        target="cuda",
        cuda_arch=arch,
        batch=len(images),
        plan=plan,
        precision=precision,
        calib="digits-train",
    )
    output = compiled.run(images.numpy())
    base = apply_plan_to_torch(model, plan)
    _assert_matches_the_reduced_reference(output, base, precision, images, compiled.quantization)
