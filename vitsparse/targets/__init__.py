"""Compilation targets: presets resolved into TargetSpecs, the machine they are resolved on,
library export per target, and the format of a target's measured cost table. Loaded on first
use (presets and export need TVM; the cost-table format does not)."""

from vitsparse._lazy import lazy_api

_EXPORT = "vitsparse.targets.export"
_HOST = "vitsparse.targets.host"
_PRESETS = "vitsparse.targets.presets"
_PRECISION = "vitsparse.targets.precision"
_API = {
    "check_toolchain": _EXPORT,
    "compile_cuda_source": _EXPORT,
    "cuda_source": _EXPORT,
    "export_library": _EXPORT,
    "nvcc_cuda_compile": _EXPORT,
    "HostInfo": _HOST,
    "detect_host": _HOST,
    "host_info": _HOST,
    "DEFAULT_CUDA_ARCH": _PRESETS,
    "PRESETS": _PRESETS,
    "TargetSpec": _PRESETS,
    "list_presets": _PRESETS,
    "resolve_target": _PRESETS,
    "with_cores": _PRESETS,
    "DEFAULT_PRECISION": _PRECISION,
    "PRECISIONS": _PRECISION,
    "check_precision": _PRECISION,
    "fp16_lanes": _PRECISION,
    "int8_kernels": _PRECISION,
    "int8_lanes": _PRECISION,
    "paired_kernels": _PRECISION,
    "paired_lanes": _PRECISION,
    "with_precision": _PRECISION,
}
__all__ = sorted(_API)
__getattr__, __dir__ = lazy_api(__name__, _API)
