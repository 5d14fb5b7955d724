"""Compilation targets: presets resolved into TargetSpecs, and library export per target."""

from vitsparse.targets.export import (
    check_toolchain,
    compile_cuda_source,
    cuda_source,
    export_library,
    nvcc_cuda_compile,
)
from vitsparse.targets.presets import (
    DEFAULT_CUDA_ARCH,
    PRESETS,
    HostInfo,
    TargetSpec,
    detect_host,
    list_presets,
    resolve_target,
)

__all__ = [
    "DEFAULT_CUDA_ARCH",
    "PRESETS",
    "HostInfo",
    "TargetSpec",
    "check_toolchain",
    "compile_cuda_source",
    "cuda_source",
    "detect_host",
    "export_library",
    "list_presets",
    "nvcc_cuda_compile",
    "resolve_target",
]
