"""Write compiled executables as shared libraries for their target.

CPU targets link with the host compiler or the spec's cross compiler. For CUDA, the pip build of
TVM 0.27 has no CUDA runtime, so ``tvm.compile`` keeps each kernel module as CUDA *source*
(format ``"cuda"``), which a CUDA-enabled TVM would JIT-compile (nvrtc by default) when the
library is loaded. :func:`export_library` instead compiles that source with nvcc here, for the
spec's arch, and stores the fatbin in the library: the GPU machine then loads machine code and
needs neither nvcc nor nvrtc. Where TVM's CUDA runtime *is* linked (a GPU machine), the
kernels are compiled during ``tvm.compile`` by the ``tvm_callback_cuda_compile`` hook;
:func:`nvcc_cuda_compile` routes that hook through nvcc as well.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vitsparse._tvm import tvm
from vitsparse.errors import TargetError
from vitsparse.targets.presets import TargetSpec

_INSTALL_SCRIPT = "scripts/install_system_deps.sh"

# Where to get each tool; a tool missing here is reported as 'install <tool>'.
_TOOL_SOURCES: dict[str, str] = {
    "aarch64-linux-gnu-g++": f"apt package g++-aarch64-linux-gnu (run {_INSTALL_SCRIPT} as root)",
    "x86_64-linux-gnu-g++": "apt package g++-x86-64-linux-gnu",
    "g++": "apt package g++",
    "nvcc": "the NVIDIA CUDA toolkit (12.x or 13.x); put its bin/ directory on PATH",
}

_U64 = struct.Struct("<Q")
_CUDA_KIND = "cuda"  # module kind of TVM's CUDA module (real or codegen fallback)
_DSO_PLACEHOLDER = b"_lib"


def check_toolchain(spec: TargetSpec) -> None:
    """Raise TargetError naming the first tool ``spec`` needs that this machine lacks.

    The tools are the linker for host code (``spec.cross_compiler`` or the host C++ compiler)
    and, for CUDA, nvcc, which must also know the spec's arch.
    """
    for tool in _required_tools(spec):
        if shutil.which(tool) is None:
            source = _TOOL_SOURCES.get(tool, f"a package providing {tool}")
            raise TargetError(
                f"target {spec.key!r} needs {tool!r}, which is not on PATH; install {source}"
            )
    if spec.device_compiler == "nvcc":
        _check_nvcc_arch(str(spec.target.attrs["arch"]))


def export_library(executable, path: str | Path, spec: TargetSpec) -> Path:
    """Write ``executable`` as a shared library for ``spec`` at ``path``, atomically.

    Parameters
    ----------
    executable
        The result of ``tvm.compile`` (a Relax VMExecutable) or a runtime Module.
    path
        Destination ``.so`` file; its directory is created if needed. The library is built in
        a temporary directory beside it and moved into place with ``os.replace``.
    spec
        The target the executable was compiled for.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if path.suffix != ".so":
        raise TargetError(f"library path {str(path)!r} must end in '.so'")
    check_toolchain(spec)
    module = _runtime_module(executable)
    cc = tvm.support.cc
    fcompile = cc.cross_compiler(spec.cross_compiler) if spec.cross_compiler else cc.create_shared
    fpack = _nvcc_pack_imports(spec) if spec.device_compiler == "nvcc" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_path = Path(tmp) / path.name
        try:
            module.export_library(str(tmp_path), fcompile=fcompile, fpack_imports=fpack)
        except (RuntimeError, OSError) as err:  # how tvm.support.cc reports a failed link
            linker = spec.cross_compiler or cc.get_cc()
            raise TargetError(
                f"linking {path.name} for {spec.key!r} with {linker} failed: {err}"
            ) from err
        os.replace(tmp_path, path)
    return path


def cuda_source(executable) -> str:
    """The generated CUDA C++ source of every CUDA module in ``executable``."""
    sources = [m.inspect_source("cuda") for m in _cuda_modules(_runtime_module(executable))]
    if not sources:
        raise TargetError("the executable has no CUDA module; was it built for a CUDA target?")
    return "\n".join(sources)


def compile_cuda_source(source: str, spec: TargetSpec) -> bytes:
    """Compile CUDA source to a fatbin for ``spec``'s arch with nvcc (no GPU needed).

    ``-arch sm_XX`` puts SASS for sm_XX and compute_XX PTX in the fatbin, so newer GPUs can
    run it too (the driver JIT-compiles the PTX).
    """
    arch = str(spec.target.attrs["arch"])
    with spec.target:  # compile_cuda reads the compute version from the current target
        try:
            binary = tvm.support.nvcc.compile_cuda(
                source, target_format="fatbin", arch=arch, compiler="nvcc"
            )
        except RuntimeError as err:
            log = str(err).rpartition("Compilation error:")[2].strip()
            raise TargetError(f"nvcc failed to compile CUDA kernels for {arch}: {log}") from None
    return bytes(binary)


@contextmanager
def nvcc_cuda_compile(spec: TargetSpec) -> Iterator[None]:
    """Route TVM's CUDA JIT hook (``tvm_callback_cuda_compile``) through nvcc for ``spec``.

    Only matters where TVM's CUDA runtime is linked (a GPU machine): there ``tvm.compile`` and
    loading a library with CUDA source call the hook, which defaults to nvrtc. The previous
    hook is restored on exit. The hook is process-global: do not nest across threads.
    """
    name = "tvm_callback_cuda_compile"
    previous = tvm.get_global_func(name, allow_missing=True)

    def _compile(code, *_target):
        return compile_cuda_source(str(code), spec)

    tvm.register_global_func(name, _compile, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm.register_global_func(name, previous, override=True)


def _required_tools(spec: TargetSpec) -> list[str]:
    linker = spec.cross_compiler or tvm.support.cc.get_cc()
    return [linker] + ([spec.device_compiler] if spec.device_compiler else [])


def _check_nvcc_arch(arch: str) -> None:
    digits = "".join(ch for ch in arch[3:] if ch.isdigit())
    try:
        out = subprocess.run(
            ["nvcc", "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise TargetError(f"cannot query nvcc's supported archs: {err}") from None
    supported = sorted(
        {line.strip().removeprefix("compute_") for line in out.split() if "compute_" in line},
        key=lambda d: int("".join(ch for ch in d if ch.isdigit()) or 0),
    )
    if supported and digits not in supported:
        raise TargetError(
            f"this nvcc cannot compile for {arch!r}; it supports "
            f"{['sm_' + d for d in supported]}; pick one with cuda_arch"
        )


def _runtime_module(executable):
    """The runtime Module inside a Relax executable (or the module itself)."""
    module = getattr(executable, "mod", executable)
    if not isinstance(module, tvm.runtime.Module):
        raise TargetError(
            f"expected the result of tvm.compile or a runtime Module, got {type(executable)!r}"
        )
    return module


def _cuda_modules(module) -> list:
    found, seen, stack = [], [], [module]
    while stack:
        mod = stack.pop()
        if any(mod.same_as(s) for s in seen):
            continue
        seen.append(mod)
        if mod.kind == _CUDA_KIND:
            found.append(mod)
        stack.extend(mod.imports)
    return found


def _nvcc_pack_imports(spec: TargetSpec) -> Callable:
    """An ``fpack_imports`` for export_library that nvcc-compiles CUDA source modules."""

    def fpack(module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        pack_to_tensor = tvm.get_global_func("runtime.ModulePackImportsToTensor")
        blob = pack_to_tensor(module).numpy().tobytes()
        sources = [m.inspect_source("cuda").encode() for m in _cuda_modules(module)]
        blob = _compile_cuda_in_blob(blob, sources, lambda src: compile_cuda_source(src, spec))
        codegen_blob = tvm.get_global_func("codegen.codegen_blob")
        host = spec.target.host if spec.target.host is not None else spec.target
        obj = codegen_blob(blob, is_system_lib, str(host), symbol_prefix)
        out = os.path.join(workspace_dir, f"{symbol_prefix}devc.o")
        obj.write_to_file(out)
        return out

    return fpack


def _compile_cuda_in_blob(
    blob: bytes, sources: list[bytes], compile_fn: Callable[[str], bytes]
) -> bytes:
    """Replace CUDA-source modules in a packed import blob by nvcc fatbins.

    Blob layout (TVM src/target/codegen.cc, PackImportsToBytes): u64 size, then the import
    tree (two u64 vectors), then per module group a string kind and, unless the kind is
    ``_lib``, its SaveToBytes payload. Strings and byte payloads are u64 length + bytes. A CUDA
    payload is ``fmt, function table, code``; for ``fmt == "cuda"`` the code is the source.
    """
    reader = _Reader(blob)
    size = reader.u64()
    if size != len(blob) - _U64.size:
        raise TargetError("unexpected layout of TVM's packed module imports (size header)")
    row_ptr = reader.u64_vector()
    tree_end = reader.skip_u64_vector()
    out = [blob[_U64.size : tree_end]]
    for _ in range(len(row_ptr) - 1):
        kind = reader.string()
        out.append(_U64.pack(len(kind)) + kind)
        if kind == _DSO_PLACEHOLDER:
            continue
        payload = reader.string()
        if kind == _CUDA_KIND.encode():
            payload = _compile_cuda_payload(payload, sources, compile_fn)
        out.append(_U64.pack(len(payload)) + payload)
    body = b"".join(out)
    return _U64.pack(len(body)) + body


def _compile_cuda_payload(
    payload: bytes, sources: list[bytes], compile_fn: Callable[[str], bytes]
) -> bytes:
    fmt = _Reader(payload).string()
    if fmt != b"cuda":  # already machine code (compiled by tvm.compile on a GPU machine)
        return payload
    for src in sources:
        tail = _U64.pack(len(src)) + src
        if payload.endswith(tail):
            function_table = payload[_U64.size + len(fmt) : len(payload) - len(tail)]
            fatbin = compile_fn(src.decode())
            fmt_out = b"fatbin"
            return (
                _U64.pack(len(fmt_out)) + fmt_out + function_table + _U64.pack(len(fatbin)) + fatbin
            )
    raise TargetError(
        "unexpected layout of TVM's CUDA module payload: its code is none of the module sources"
    )


class _Reader:
    """Little-endian reader for TVM's support::Stream serialisation."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        if self.pos + _U64.size > len(self.data):
            raise TargetError("unexpected end of TVM's packed module imports")
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += _U64.size
        return value

    def u64_vector(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def skip_u64_vector(self) -> int:
        count = self.u64()
        self.pos += _U64.size * count
        return self.pos

    def string(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise TargetError("unexpected end of TVM's packed module imports")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value
