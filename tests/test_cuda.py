"""CUDA: deit_tiny and deit_small, dense and block-sparse, compile for sm_80 and sm_90 here (nvcc
builds the device code into the library); on a machine with a GPU they run, match PyTorch, and
bench times PyTorch eager on the same GPU (`gpu` marker; skipped without one)."""

import shutil

import numpy as np
import pytest
import torch

from vitsparse._tvm import tvm
from vitsparse.frontend import load_torch_model
from vitsparse.jobs.compile import compile_model
from vitsparse.plan import apply_plan_to_torch
from vitsparse.pruning.block_mask import block_mask_plan

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
