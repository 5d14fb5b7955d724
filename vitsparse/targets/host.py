"""The compiling machine: its ISA, LLVM CPU name, physical cores, SIMD level and GPU, detected
rather than assumed (the same checkout runs on a znver4 one month and a znver5 the next)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vitsparse._tvm import host_cpu_name, tvm

_ISA_ALIASES: Mapping[str, str] = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}

# /proc/cpuinfo flags -> SIMD level recorded in tuning keys, best first.
_SIMD_LEVELS: tuple[tuple[str, str], ...] = (
    ("avx512f", "avx512"),
    ("avx2", "avx2"),
    ("asimd", "neon"),
    ("sse2", "sse2"),
)


@dataclass(frozen=True)
class HostInfo:
    """Facts about the compiling machine that presets depend on."""

    isa: str  # 'x86_64' | 'aarch64' | ...
    cpu_name: str  # LLVM's name, e.g. 'znver4'
    physical_cores: int
    cpu_flags: frozenset[str] = field(repr=False)
    has_cuda_gpu: bool

    @property
    def simd(self) -> str:
        """Best SIMD level of the host CPU, e.g. 'avx512', 'avx2', 'neon'."""
        for flag, level in _SIMD_LEVELS:
            if flag in self.cpu_flags:
                return level
        return "scalar"


def detect_host() -> HostInfo:
    """Inspect this machine (CPU name, physical cores, CPU flags, CUDA GPU)."""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().split("\n\n")
    except OSError:
        blocks = []
    for block in blocks:
        info = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines())
        )
        if "processor" not in info:
            continue
        if allowed is not None and int(info["processor"]) not in allowed:
            continue
        flags.update((info.get("flags") or info.get("Features") or "").split())
        if "core id" in info:
            cores.add((info.get("physical id", "0"), info["core id"]))
    logical = len(allowed) if allowed is not None else (os.cpu_count() or 1)
    return HostInfo(
        isa=normalise_isa(platform.machine()),
        cpu_name=host_cpu_name(),
        physical_cores=len(cores) or logical,
        cpu_flags=frozenset(flags),
        has_cuda_gpu=bool(tvm.cuda(0).exist),
    )


def normalise_isa(name: str) -> str:
    """An ISA name as ``uname -m`` or an LLVM triple spells it, in vitsparse's spelling."""
    name = name.lower()
    return _ISA_ALIASES.get(name, name)


def host_info() -> dict[str, Any]:
    """This machine's CPU as reports record it: model name, LLVM name, SIMD level, core and
    logical CPU counts, CUDA GPU, OS."""
    host = detect_host()
    return {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "llvm_cpu": host.cpu_name,
        "simd": host.simd,
        "physical_cores": host.physical_cores,
        "logical_cpus": os.cpu_count(),
        "cuda_gpu": host.has_cuda_gpu,
        "os": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
