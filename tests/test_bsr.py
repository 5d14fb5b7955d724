"""The BSR kernel family: packing, numerics against numpy on this CPU (every vector width the
template knows, both epilogues, every task order), the tuning design space, and the ARM and CUDA
builds (nvcc; numerics on a GPU where there is one)."""

import math
import shutil
import subprocess

import numpy as np
import pytest

from vitsparse._tvm import Schedule, Target, host_cpu_name, ms, tvm
from vitsparse.schedules import bsr
from vitsparse.schedules.tuning import bsr_alloc_argument

TARGET = Target({"kind": "llvm", "mcpu": host_cpu_name(), "num-cores": 2})
LANES = bsr.vector_lanes(TARGET)


def _problem(m, k, n, block, keep, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    rows, cols = block
    w = rng.standard_normal((n, k), dtype=np.float32)
    kept = rng.random((n // rows, k // cols)) < keep
    b = rng.standard_normal(n, dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    return x, w, kept, b, bsr.to_bsr(w, kept, block, dtype)


def _reference(x, weight, b, epilogue):
    y = x.astype(np.float64) @ weight.to_dense().astype(np.float64).T + b
    if epilogue == "gelu":
        y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    return y


def _scheduled(shape, lanes=LANES, tile_order=0):
    sch = Schedule(bsr.bsr_primfunc(shape).with_attr("global_symbol", "main"))
    knobs = bsr.BSRKnobs(bsr.default_knobs(shape).col_unroll, tile_order)
    bsr.schedule_bsr_cpu(sch, knobs, lanes)
    return sch.mod


def _run(mod, target, x, weight, b, dtype="float32"):
    lib = tvm.compile(mod, target=target)
    y = tvm.runtime.tensor(np.zeros((x.shape[0], weight.shape[0]), dtype))
    args = [x.astype(dtype), weight.data, weight.indices, weight.indptr, b.astype(dtype)]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


@pytest.mark.parametrize(
    ("m", "k", "n", "block", "keep", "epilogue"),
    [
        (197, 128, 96, (32, 32), 0.5, "none"),
        (197, 64, 64, (16, 16), 0.3, "gelu"),
        (5, 128, 128, (64, 32), 0.7, "none"),
        (37, 64, 64, (32, 64), 0.5, "gelu"),
        (16, 32, 16, (8, 16), 0.5, "none"),
        (9, 64, 64, (16, 16), 0.0, "none"),
        (3, 64, 128, (64, 64), 1.0, "gelu"),
    ],
)
def test_bsr_kernel_matches_masked_dense(m, k, n, block, keep, epilogue):
    x, w, kept, b, weight = _problem(m, k, n, block, keep)
    masked = w * np.kron(kept, np.ones(block, dtype=np.float32))
    np.testing.assert_array_equal(weight.to_dense(), masked)
    assert weight.density == pytest.approx(kept.mean())
    shape = bsr.BSRShape.of(m, weight, epilogue=epilogue, target=TARGET)
    assert shape.padded_m % shape.row_tile == 0 and shape.padded_m >= m
    got = _run(_scheduled(shape), TARGET, x, weight, b)
    np.testing.assert_allclose(got, _reference(x, weight, b, epilogue), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("lanes", "tile_order"), [(16, 1), (8, 0), (8, 1), (4, 0)])
def test_every_vector_width_and_task_order(lanes, tile_order):
    # 4 lanes is the NEON width; the template is the same, so its numerics are checked here.
    x, _, _, b, weight = _problem(23, 128, 192, (32, 32), 0.4, seed=3)
    shape = bsr.BSRShape.of(23, weight, epilogue="gelu", target=TARGET)
    got = _run(_scheduled(shape, lanes, tile_order), TARGET, x, weight, b)
    np.testing.assert_allclose(got, _reference(x, weight, b, "gelu"), rtol=1e-5, atol=1e-4)


def test_vector_lanes_and_row_tiles_follow_the_target():
    avx512 = Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    avx2 = Target({"kind": "llvm", "mcpu": "haswell"})
    neon = Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert [bsr.vector_lanes(t) for t in (avx512, avx2, neon)] == [16, 8, 4]
    # ~16 accumulator registers on x86, ~24 of NEON's 32.
    assert bsr.choose_row_tile(32, 16) == 8 and bsr.choose_row_tile(32, 4) == 3
    assert bsr.choose_row_tile(64, 16) == 4 and bsr.choose_row_tile(16, 8) == 8
    assert bsr.choose_gpu_row_tile(32) * 32 == 256  # threads per block
    _, _, _, _, weight = _problem(197, 64, 64, (32, 32), 0.5)
    cuda = Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    assert bsr.BSRShape.of(197, weight, target=cuda).row_tile == bsr.choose_gpu_row_tile(32, 197)


def test_unused_ell_slots_cost_no_flops():
    # The guard is on the update, so it is in the workload a tuning record is keyed on.
    _, _, _, _, weight = _problem(8, 64, 64, (16, 16), 0.5)
    script = bsr.bsr_primfunc(bsr.BSRShape.of(8, weight, target=TARGET)).script()
    assert "if e < indptr[" in script.replace("v_e", "e")


def test_design_space_samples_build_and_are_correct():
    x, _, _, b, weight = _problem(31, 128, 128, (32, 32), 0.5, seed=5)
    shape = bsr.BSRShape.of(31, weight, target=TARGET)
    mod = tvm.IRModule({"main": bsr.bsr_primfunc(shape).with_attr("global_symbol", "main")})
    space = ms.space_generator.ScheduleFn(
        bsr.cpu_design_space(LANES), sch_rules=[], postprocs=[], mutator_probs={}
    )
    ctx = ms.TuneContext(mod=mod, target=TARGET, space_generator=space, task_name="bsr")
    spaces = ctx.generate_design_space()
    assert len(spaces) == len(bsr.TILE_ORDERS)
    for design in spaces:
        decisions = [inst.kind.name for inst in design.trace.insts]
        assert "SamplePerfectTile" in decisions  # the column unroll is a tunable knob
        got = _run(design.mod, TARGET, x, weight, b)
        np.testing.assert_allclose(got, _reference(x, weight, b, "none"), rtol=1e-5, atol=1e-4)


def test_runner_allocates_valid_indices():
    x, _, _, b, weight = _problem(31, 256, 128, (32, 32), 0.25)
    shape = bsr.BSRShape.of(31, weight, target=TARGET)
    args_info = [
        info.as_json() for info in ms.arg_info.ArgInfo.from_prim_func(bsr.bsr_primfunc(shape))
    ]
    (args,) = bsr_alloc_argument(tvm.cpu(), args_info, 1)
    indices, indptr = args[2].numpy(), args[3].numpy()
    ell = shape.ell_width
    assert indptr[0] == 0 and indptr[-1] == shape.nnzb and np.all(np.diff(indptr) >= 0)
    assert np.all(np.diff(indptr) <= ell) and np.all((indices >= 0) & (indices < ell))
    for r in range(shape.block_rows):  # distinct, ascending column blocks per block-row
        row = indices[indptr[r] : indptr[r + 1]]
        assert np.all(np.diff(row) > 0)


@pytest.mark.parametrize(
    ("block", "shape", "match"),
    [((24, 24), (48, 48), "must be one of"), ((64, 64), (32, 64), "does not divide")],
)
def test_to_bsr_rejects_bad_blocks(block, shape, match):
    with pytest.raises(ValueError, match=match):
        bsr.to_bsr(np.zeros(shape, np.float32), np.ones((1, 1), bool), block)


def test_arm_build_is_aarch64(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (scripts/install_system_deps.sh installs it)")
    neon = Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    _, _, _, _, weight = _problem(197, 384, 384, (32, 32), 0.5)
    shape = bsr.BSRShape.of(197, weight, epilogue="gelu", target=neon)
    lib = tvm.compile(_scheduled(shape, bsr.vector_lanes(neon)), target=neon)
    path = tmp_path / "bsr.so"
    lib.export_library(str(path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    described = subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
    assert "aarch64" in described


def _cuda_build(shape):
    from vitsparse.targets import resolve_target
    from vitsparse.targets.export import nvcc_cuda_compile

    spec = resolve_target("cuda", cuda_arch="sm_80")
    sch = Schedule(bsr.bsr_primfunc(shape).with_attr("global_symbol", "main"))
    bsr.schedule_bsr_gpu(sch)
    with nvcc_cuda_compile(spec):
        return spec, tvm.compile(sch.mod, target=spec.target)


@pytest.mark.parametrize(
    ("block", "dtype", "epilogue"),
    [((32, 32), "float32", "gelu"), ((16, 64), "float16", "none"), ((64, 64), "float16", "gelu")],
)
def test_cuda_kernels_compile_with_nvcc(block, dtype, epilogue):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc missing: the CUDA toolkit is not installed on this machine")
    from vitsparse.targets.export import compile_cuda_source

    _, _, _, _, weight = _problem(197, 384, 384, block, 0.5, dtype=dtype)
    cuda = Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    shape = bsr.BSRShape.of(197, weight, epilogue=epilogue, target=cuda)
    spec, lib = _cuda_build(shape)
    source = lib.mod.imports[0].inspect_source()
    assert "__shared__" in source and "__syncthreads" in source
    assert ("half" in source) == (dtype == "float16")
    assert compile_cuda_source(source, spec)[:4] != b""


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-4), ("float16", 5e-2)])
def test_cuda_kernel_numerics_on_gpu(dtype, atol):
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine")
    x, _, _, b, weight = _problem(197, 384, 1152, (32, 32), 0.5, seed=9, dtype=dtype)
    cuda = Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    shape = bsr.BSRShape.of(197, weight, epilogue="gelu", target=cuda)
    _, lib = _cuda_build(shape)
    dev = tvm.cuda(0)
    args = [x.astype(dtype), weight.data, weight.indices, weight.indptr, b.astype(dtype)]
    y = tvm.runtime.tensor(np.zeros((197, 1152), dtype), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], y)
    ref = _reference(x.astype(dtype).astype(np.float32), weight, b.astype(dtype), "gelu")
    np.testing.assert_allclose(y.numpy().astype(np.float64), ref, rtol=1e-2, atol=atol)
