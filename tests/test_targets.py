"""Target presets, their resolution, and library export (real builds of a tiny MLP)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vitsparse._tvm import dlight, host_cpu_name, relax, tvm
from vitsparse.errors import TargetError
from vitsparse.targets import (
    DEFAULT_CUDA_ARCH,
    HostInfo,
    TargetSpec,
    check_toolchain,
    cuda_source,
    detect_host,
    export_library,
    list_presets,
    nvcc_cuda_compile,
    resolve_target,
)
from vitsparse.targets import export as export_module

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "scripts" / "install_system_deps.sh"
FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")
SHAPES = {"x": (4, 16), "w1": (16, 32), "b1": (32,), "w2": (32, 8), "b2": (8,)}


def _host(isa: str = "x86_64", flags: tuple[str, ...] = ("sse2", "avx2", "avx512f"), gpu=False):
    cpu = "znver4" if isa == "x86_64" else "neoverse-n1"
    return HostInfo(
        isa=isa, cpu_name=cpu, physical_cores=2, cpu_flags=frozenset(flags), has_cuda_gpu=gpu
    )


def _mlp_module() -> tvm.IRModule:
    """x @ w1 + b1 -> GELU -> @ w2 + b2, weights as inputs; a fresh module on every call."""
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in SHAPES.items()]
    x, w1, b1, w2, b2 = params
    with bb.function("main", params):
        with bb.dataflow():
            h = bb.emit(relax.op.add(relax.op.matmul(x, w1), b1))
            h = bb.emit(relax.op.nn.gelu(h))
            y = bb.emit_output(relax.op.add(relax.op.matmul(h, w2), b2))
        bb.emit_func_output(y)
    return bb.get()


def _mlp_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype("float32") for s in SHAPES.values()]


def _mlp_numpy(x, w1, b1, w2, b2) -> np.ndarray:
    h = x @ w1 + b1
    h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    return h @ w2 + b2


def _run_vm(executable, spec: TargetSpec, inputs: list[np.ndarray]) -> np.ndarray:
    dev = spec.device
    vm = relax.VirtualMachine(executable, dev)
    return vm["main"](*[tvm.runtime.tensor(a, dev) for a in inputs]).numpy()


def _gpu_schedule(mod: tvm.IRModule, spec: TargetSpec) -> tvm.IRModule:
    # dlight's ApplyDefaultSchedule updates the module it is given in place: pass a fresh one.
    with spec.target:
        return dlight.ApplyDefaultSchedule(
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        )(relax.transform.LegalizeOps()(mod))


def _file_description(path: Path) -> str:
    return subprocess.run(["file", str(path)], capture_output=True, text=True, check=True).stdout


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (sudo {INSTALL_SCRIPT.relative_to(REPO)})")


# ---- presets ----------------------------------------------------------------------------------


def test_list_presets():
    assert list_presets() == ["arm", "arm82", "arm84", "cuda", "x86"]


@pytest.mark.skipif(detect_host().isa != "x86_64", reason="the x86 preset needs an x86-64 host")
def test_x86_preset_describes_this_machine():
    host = detect_host()
    spec = resolve_target("X86")  # case-insensitive
    assert spec.name == "x86"
    assert spec.target.kind.name == "llvm"
    assert str(spec.target.attrs["mcpu"]) == host_cpu_name()
    assert int(spec.target.attrs["num-cores"]) == host.physical_cores
    assert 1 <= host.physical_cores <= (os.cpu_count() or 1)
    assert (spec.device_type, spec.schedule_family) == ("cpu", "cpu")
    assert spec.cross_compiler is None and spec.runs_locally
    assert spec.key == f"x86-{host_cpu_name()}-{host.simd}-{host.physical_cores}c"


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (("sse2", "avx2", "avx512f"), "x86-znver4-avx512-2c"),
        (("sse2", "avx2"), "x86-znver4-avx2-2c"),
        (("sse2",), "x86-znver4-sse2-2c"),
    ],
)
def test_x86_key_records_simd_level(flags, key):
    assert resolve_target("x86", host=_host(flags=flags)).key == key


def test_arm_preset_is_a_cross_target():
    spec = resolve_target("arm", host=_host())
    attrs = spec.target.attrs
    assert str(attrs["mtriple"]) == "aarch64-linux-gnu"
    assert list(attrs["mattr"]) == ["+neon"]
    assert str(attrs["mcpu"]) == "generic"
    assert spec.target.host is None or spec.target.host.kind.name == "llvm"
    assert spec.cross_compiler == "aarch64-linux-gnu-g++"
    assert not spec.runs_locally
    assert (spec.device_type, spec.schedule_family, spec.key) == ("cpu", "cpu", "arm-aarch64-neon")


def test_arm_preset_on_an_arm_host_is_native():
    spec = resolve_target("arm", host=_host("aarch64", flags=("asimd",)))
    assert spec.cross_compiler is None and spec.runs_locally


def test_cuda_preset():
    spec = resolve_target("cuda", host=_host())
    assert spec.target.kind.name == "cuda"
    assert str(spec.target.attrs["arch"]) == DEFAULT_CUDA_ARCH == "sm_80"
    assert spec.target.host.kind.name == "llvm"
    assert str(spec.target.host.attrs["mcpu"]) == "znver4"
    assert (spec.device_type, spec.schedule_family) == ("cuda", "gpu")
    assert spec.cross_compiler is None and spec.device_compiler == "nvcc"
    assert spec.key == "cuda-sm_80"
    assert not spec.runs_locally
    assert resolve_target("cuda", host=_host(gpu=True)).runs_locally
    sm90 = resolve_target("cuda", cuda_arch="sm_90", host=_host())
    assert (str(sm90.target.attrs["arch"]), sm90.key) == ("sm_90", "cuda-sm_90")


def test_raw_dicts_resolve_to_custom_specs():
    host = _host()
    arm = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, host=host)
    assert (arm.name, arm.cross_compiler, arm.runs_locally) == (
        "custom",
        "aarch64-linux-gnu-g++",
        False,
    )
    cpu = resolve_target({"kind": "llvm", "mcpu": "znver4"}, host=host)
    assert (cpu.device_type, cpu.schedule_family, cpu.cross_compiler) == ("cpu", "cpu", None)
    gpu = resolve_target({"kind": "cuda", "arch": "sm_86"}, host=host)
    assert (gpu.device_type, gpu.schedule_family) == ("cuda", "gpu")
    assert gpu.target.host is not None and str(gpu.target.attrs["arch"]) == "sm_86"
    # keys: stable, distinct per target, filesystem-safe
    again = resolve_target({"kind": "llvm", "mcpu": "znver4"}, host=host)
    assert again.key == cpu.key and again == cpu
    keys = {arm.key, cpu.key, gpu.key}
    assert len(keys) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", k) for k in keys)


def test_json_string_resolves_like_the_dict():
    config = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    from_json = resolve_target(json.dumps(config), host=_host())
    from_dict = resolve_target(config, host=_host())
    assert from_json.key == from_dict.key
    assert str(from_json.target) == str(from_dict.target)


def test_spec_json_round_trip():
    for name in list_presets():
        spec = resolve_target(name, host=_host())
        data = json.loads(json.dumps(spec.to_json()))
        assert data["target"]["kind"] == spec.target.kind.name
        back = TargetSpec.from_json(data)
        assert back.key == spec.key and str(back.target) == str(spec.target)


def test_resolving_a_spec_returns_it():
    spec = resolve_target("arm", host=_host())
    assert resolve_target(spec) is spec


# ---- resolution errors ------------------------------------------------------------------------


def test_unknown_preset_lists_presets():
    with pytest.raises(TargetError, match="x87") as err:
        resolve_target("x87", host=_host())
    assert all(name in str(err.value) for name in list_presets())


def test_bad_cuda_arch():
    with pytest.raises(TargetError, match=r"'sm9'.*sm_80"):
        resolve_target("cuda", cuda_arch="sm9", host=_host())


def test_dict_without_kind():
    with pytest.raises(TargetError, match=r"no 'kind'.*\['cuda', 'llvm'\]"):
        resolve_target({"mcpu": "znver4"}, host=_host())


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ({"kind": "opencl"}, {}, r"'opencl'.*\['cuda', 'llvm'\]"),
        ({"kind": "llvm", "no-such-option": 1}, {}, "no-such-option"),
        ({"kind": "llvm", "mtriple": "riscv64-linux-gnu"}, {}, r"riscv64.*aarch64"),
        ('{"kind": "llvm",', {}, "does not parse"),
        ("x86", {"cuda_arch": "sm_80"}, r"'sm_80'.*'x86'"),
        ({"kind": "cuda", "arch": "sm_86"}, {"cuda_arch": "sm_90"}, "conflicts"),
        (42, {}, "preset name"),
    ],
)
def test_bad_targets_name_the_problem(spec, kwargs, message):
    with pytest.raises(TargetError, match=message):
        resolve_target(spec, host=_host(), **kwargs)


def test_x86_preset_refuses_a_non_x86_host():
    with pytest.raises(TargetError, match=r"'x86'.*aarch64"):
        resolve_target("x86", host=_host("aarch64", flags=("asimd",)))


# ---- toolchain checks -------------------------------------------------------------------------


def _which_without(*missing: str):
    real = shutil.which

    def which(cmd, *args, **kwargs):
        return None if cmd in missing else real(cmd, *args, **kwargs)

    return which


def test_missing_cross_compiler_names_the_package(monkeypatch, tmp_path):
    spec = resolve_target("arm", host=_host())
    monkeypatch.setattr(export_module.shutil, "which", _which_without("aarch64-linux-gnu-g++"))
    with pytest.raises(TargetError, match=r"aarch64-linux-gnu-g\+\+.*install_system_deps\.sh"):
        check_toolchain(spec)
    with pytest.raises(TargetError, match=r"aarch64-linux-gnu-g\+\+"):
        export_library(None, tmp_path / "never.so", spec)
    assert not any(tmp_path.iterdir())


def test_unknown_cross_compiler_binary():
    spec = dataclasses.replace(resolve_target("arm", host=_host()), cross_compiler="no-such-g++")
    with pytest.raises(TargetError, match="no-such-g"):
        check_toolchain(spec)


def test_missing_nvcc(monkeypatch):
    monkeypatch.setattr(export_module.shutil, "which", _which_without("nvcc"))
    with pytest.raises(TargetError, match="'nvcc'.*CUDA toolkit"):
        check_toolchain(resolve_target("cuda", host=_host()))


def test_nvcc_rejects_an_arch_it_cannot_build():
    _require("nvcc")
    with pytest.raises(TargetError, match=r"'sm_10'.*sm_\d+"):
        check_toolchain(resolve_target("cuda", cuda_arch="sm_10", host=_host()))


def test_export_rejects_a_non_so_path(tmp_path):
    with pytest.raises(TargetError, match=r"\.tar.*\.so"):
        export_library(None, tmp_path / "lib.tar", resolve_target("arm", host=_host()))


def test_nvcc_hook_is_scoped():
    name = "tvm_callback_cuda_compile"
    before = tvm.get_global_func(name)
    with nvcc_cuda_compile(resolve_target("cuda", host=_host())):
        assert not tvm.get_global_func(name).same_as(before)
    assert tvm.get_global_func(name).same_as(before)


# ---- real builds ------------------------------------------------------------------------------


@pytest.mark.skipif(detect_host().isa != "x86_64", reason="the x86 preset needs an x86-64 host")
def test_x86_build_runs_and_exports(tmp_path):
    spec = resolve_target("x86")
    inputs = _mlp_inputs()
    expected = _mlp_numpy(*inputs)
    executable = tvm.compile(_mlp_module(), spec.target)
    np.testing.assert_allclose(_run_vm(executable, spec, inputs), expected, rtol=1e-4, atol=1e-4)

    path = export_library(executable, tmp_path / "out" / "mlp.so", spec)
    assert path == tmp_path / "out" / "mlp.so"
    assert [p.name for p in path.parent.iterdir()] == ["mlp.so"]  # no temp files left behind
    loaded = tvm.runtime.load_module(str(path))
    np.testing.assert_allclose(_run_vm(loaded, spec, inputs), expected, rtol=1e-4, atol=1e-4)


def test_arm_cross_export(tmp_path):
    spec = resolve_target("arm")
    if spec.cross_compiler:
        _require(spec.cross_compiler)
    _require("file")
    executable = tvm.compile(_mlp_module(), spec.target)
    path = export_library(executable, tmp_path / "mlp_arm.so", spec)
    assert "ARM aarch64" in _file_description(path)


def test_cuda_build_compiles_with_nvcc(tmp_path):
    _require("nvcc")
    spec = resolve_target("cuda")
    with nvcc_cuda_compile(spec):  # only used where TVM's CUDA runtime is linked (GPU machines)
        executable = tvm.compile(_gpu_schedule(_mlp_module(), spec), spec.target)
    source = cuda_source(executable)
    assert "__global__" in source

    path = export_library(executable, tmp_path / "mlp_cuda.so", spec)
    data = path.read_bytes()
    if not spec.runs_locally:  # no CUDA runtime: export compiled the kernels with nvcc
        assert FATBIN_MAGIC in data
        assert b"__global__" not in data  # machine code shipped, not source
    if shutil.which("file"):
        assert "x86-64" in _file_description(path)


def _unpack_imports(blob: bytes):
    """(import tree, [(kind, payload)]) of a packed import blob; payload None for '_lib'."""
    pos = 0

    def u64() -> int:
        nonlocal pos
        pos += 8
        return int.from_bytes(blob[pos - 8 : pos], "little")

    def string() -> bytes:
        nonlocal pos
        n = u64()
        pos += n
        return blob[pos - n : pos]

    assert u64() == len(blob) - 8
    rows = [u64() for _ in range(u64())]
    children = [u64() for _ in range(u64())]
    entries = []
    for _ in range(len(rows) - 1):
        kind = string()
        entries.append((kind, None if kind == b"_lib" else string()))
    assert pos == len(blob)
    return (rows, children), entries


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(8, "little") + value


def test_packed_cuda_source_is_replaced_by_the_compiled_binary():
    """The blob rewrite keeps the other modules and the kernel table; it swaps only the code."""
    spec = resolve_target("cuda")
    executable = tvm.compile(_gpu_schedule(_mlp_module(), spec), spec.target)
    pack = tvm.get_global_func("runtime.ModulePackImportsToTensor")
    blob = pack(executable.mod).numpy().tobytes()
    source = cuda_source(executable).encode()
    compiled = []

    def fake_nvcc(src: str) -> bytes:
        compiled.append(src)
        return b"FATBIN-BYTES"

    new_blob = export_module._compile_cuda_in_blob(blob, [source], fake_nvcc)
    if spec.runs_locally:  # TVM's CUDA runtime compiled the kernels during tvm.compile
        assert new_blob == blob and not compiled
        return
    assert compiled == [source.decode()]
    tree, entries = _unpack_imports(blob)
    new_tree, new_entries = _unpack_imports(new_blob)
    assert new_tree == tree
    assert [k for k, _ in new_entries] == [k for k, _ in entries]
    for (kind, payload), (_, new_payload) in zip(entries, new_entries, strict=True):
        if kind != b"cuda":
            assert new_payload == payload
            continue
        assert payload.startswith(_string(b"cuda")) and payload.endswith(_string(source))
        table = payload[len(_string(b"cuda")) : len(payload) - len(_string(source))]
        assert new_payload == _string(b"fatbin") + table + _string(b"FATBIN-BYTES")


def test_cuda_source_needs_a_cuda_module():
    executable = tvm.compile(_mlp_module(), resolve_target("arm", host=_host()).target)
    with pytest.raises(TargetError, match="no CUDA module"):
        cuda_source(executable)


@pytest.mark.gpu
def test_cuda_library_runs_on_the_gpu(tmp_path):
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine (tvm.cuda(0).exist is False)")
    _require("nvcc")
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    spec = resolve_target("cuda", cuda_arch=arch)
    inputs = _mlp_inputs()
    with nvcc_cuda_compile(spec):
        executable = tvm.compile(_gpu_schedule(_mlp_module(), spec), spec.target)
    path = export_library(executable, tmp_path / "mlp_cuda.so", spec)
    loaded = tvm.runtime.load_module(str(path))
    out = _run_vm(loaded, spec, inputs)
    np.testing.assert_allclose(out, _mlp_numpy(*inputs), rtol=1e-3, atol=1e-3)


# ---- scripts/install_system_deps.sh -----------------------------------------------------------


def test_install_script_parses():
    subprocess.run(["bash", "-n", str(INSTALL_SCRIPT)], check=True)


def test_install_script_without_apt_exits_zero_with_a_reason():
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(INSTALL_SCRIPT)],
        env={"PATH": "/nonexistent"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert "apt-get/dpkg not found" in result.stdout
