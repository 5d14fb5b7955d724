"""Which numeric precisions a target compiles, and the refusal for those it cannot.

    fp32  every target
    int8  x86 CPUs with AVX2 (int8 values in int16 pairs through `vpmaddwd`, 8 lanes; 16 with
          AVX-512BW; int8 quads through `vpdpbusd` with AVX512-VNNI); ARM CPUs with the dot
          product (`sdot`, int8 quads, 4 lanes: the ``arm82`` preset, or ``+dotprod`` in a
          target's mattr); CUDA GPUs with int8 tensor cores (IMMA: sm_72 and later), int8
          matmuls summed in int32 (`schedules.gpu_rules`).
    bf16  x86 CPUs with AVX512-BF16 (`vdpbf16ps`, 16 lanes); refused elsewhere, naming what the
          target lacks (ARM and CUDA bf16 kernels are not built yet).
    fp16  ARM CPUs with the widening half-precision multiply-add (`fmlal`, FEAT_FHM: the
          ``arm84`` preset, or ``+fp16fml`` in a target's mattr), 4 lanes, the sums in fp32;
          CUDA GPUs with fp16 tensor cores (sm_70 and later), the sums in fp32; refused
          elsewhere, naming what the target lacks (x86 has no fp16 arithmetic here).

`check_precision` is the one place that decides; jobs call it before any import, so a bad pair
fails fast with a TargetError that names the precision, the target and the reason.
"""

from __future__ import annotations

import dataclasses

from vitsparse._precision import DEFAULT_PRECISION, PRECISIONS
from vitsparse._tvm import tvm
from vitsparse.errors import TargetError
from vitsparse.targets.presets import TargetSpec

__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "check_precision",
    "fp16_lanes",
    "int8_kernels",
    "int8_lanes",
    "paired_kernels",
    "paired_lanes",
    "with_precision",
]


def _has(target, feature: str) -> bool:
    return target.kind.name == "llvm" and bool(
        tvm.target.codegen.target_has_features(feature, target)
    )


def _cpu(target) -> str:
    for attr in ("mcpu", "mtriple", "arch"):
        value = target.attrs.get(attr)
        if value:
            return str(value)
    return target.kind.name


def _is_x86(target) -> bool:
    triple = str(target.attrs.get("mtriple", "") or "")
    return target.kind.name == "llvm" and (not triple or triple.startswith(("x86", "i686")))


def _cuda_sm(target) -> int:
    """The compute capability of a CUDA target as one number (sm_80: 80, sm_90a: 90), else 0."""
    if target.kind.name != "cuda":
        return 0
    digits = str(target.attrs.get("arch", "")).removeprefix("sm_").rstrip("af")
    return int(digits) if digits.isdigit() else 0


# The reduced precisions of CUDA targets and the first compute capability with their tensor
# cores (what `schedules.gpu_rules` compiles them to).
_CUDA_MIN_SM = {"fp16": 70, "int8": 72}


def _cuda_precisions(spec: TargetSpec) -> tuple[str, ...]:
    """The reduced precisions ``spec`` (a CUDA target) compiles; () for other targets."""
    sm = _cuda_sm(spec.target)
    return tuple(p for p, first in _CUDA_MIN_SM.items() if sm >= first)


def _check_cuda(spec: TargetSpec, precision: str, where: str) -> str:
    if precision in _cuda_precisions(spec):
        return precision
    if precision in _CUDA_MIN_SM:
        units = {"fp16": "fp16 tensor cores", "int8": "int8 tensor cores (IMMA)"}[precision]
        first = _CUDA_MIN_SM[precision]
        raise TargetError(
            f"{precision} on CUDA needs {units}, sm_{first} and later, and {where} lacks "
            f"them; give --cuda-arch sm_{first} or later, or fp32"
        )
    raise TargetError(
        f"{precision} kernels exist for x86 CPUs with avx512_bf16 only; {where} is a CUDA "
        "target (use fp16, int8 or fp32 there)"
    )


def _is_aarch64(target) -> bool:
    triple = str(target.attrs.get("mtriple", "") or "")
    return target.kind.name == "llvm" and triple.startswith(("aarch64", "arm64"))


def int8_lanes(spec: TargetSpec) -> int:
    """int32 lanes of the int8 kernels on ``spec`` (16 with AVX-512BW, 8 with AVX2, 4 on ARM
    with the dot product), else 0."""
    target = spec.target
    if _is_aarch64(target):
        return 4 if _has(target, "dotprod") else 0
    if not _is_x86(target):
        return 0
    if _has(target, "avx512bw"):
        return 16
    return 8 if _has(target, "avx2") else 0


def int8_kernels(spec: TargetSpec) -> str:
    """The int8 kernel variant of ``spec`` (`schedules.paired.INT8_VARIANTS`): ``int8dot``
    (`sdot`) on ARM, ``int8vnni`` (`vpdpbusd`) on x86 with AVX512-VNNI and AVX-512BW, else
    ``int8`` (`vpmaddwd`); "" where ``spec`` has no int8 kernels."""
    lanes = int8_lanes(spec)
    if not lanes:
        return ""
    if _is_aarch64(spec.target):
        return "int8dot"
    if lanes == 16 and _has(spec.target, "avx512vnni"):
        return "int8vnni"
    return "int8"


def bf16_lanes(spec: TargetSpec) -> int:
    """float32 lanes of the bf16 kernels on ``spec`` (16 with AVX512-BF16), else 0."""
    target = spec.target
    ok = _is_x86(target) and _has(target, "avx512bf16") and _has(target, "avx512bw")
    return 16 if ok else 0


def fp16_lanes(spec: TargetSpec) -> int:
    """float32 lanes of the fp16 kernels on ``spec`` (4 on aarch64 with FEAT_FHM), else 0."""
    target = spec.target
    ok = _is_aarch64(target) and _has(target, "fp16fml") and _has(target, "fullfp16")
    return 4 if ok else 0


def paired_lanes(spec: TargetSpec, precision: str) -> int:
    """Lanes of ``precision``'s paired kernels on ``spec`` (0 for fp32, or where it has none)."""
    if precision == "int8":
        return int8_lanes(spec)
    if precision == "bf16":
        return bf16_lanes(spec)
    if precision == "fp16":
        return fp16_lanes(spec)
    return 0


def paired_kernels(spec: TargetSpec, precision: str) -> str:
    """The kernel variant (`schedules.paired.PRECISIONS`) ``precision`` compiles to on ``spec``:
    `int8_kernels` for int8, ``bf16`` (vdpbf16ps), ``fp16fml`` (fmlal); "" for fp32, or where
    ``spec`` has no kernels of ``precision``."""
    if not paired_lanes(spec, precision):
        return ""
    if precision == "int8":
        return int8_kernels(spec)
    return {"bf16": "bf16", "fp16": "fp16fml"}[precision]


def check_precision(spec: TargetSpec, precision: str) -> str:
    """``precision`` if ``spec`` compiles it, else a TargetError saying why not."""
    if precision not in PRECISIONS:
        raise TargetError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    target = spec.target
    where = f"target {spec.name} ({_cpu(target)})"
    if precision == "fp32":
        return precision
    if target.kind.name == "cuda":
        return _check_cuda(spec, precision, where)
    if precision == "int8":
        if int8_lanes(spec):
            return precision
        if _is_x86(target):
            raise TargetError(f"int8 needs AVX2 on x86 and {where} lacks it")
        if _is_aarch64(target):
            raise TargetError(
                f"int8 on ARM needs the dot product extension (sdot, ARMv8.2 +dotprod) and "
                f"{where} lacks it; use --target arm82 for a core that has it "
                "(Cortex-A55/A76 and later, Neoverse, Graviton2), or fp32"
            )
        raise TargetError(
            f"int8 kernels exist for x86 CPUs with AVX2, ARM CPUs with the dot product and CUDA "
            f"GPUs with int8 tensor cores; {where} is none of them"
        )
    if precision == "bf16":
        if bf16_lanes(spec):
            return precision
        if _is_x86(target):
            raise TargetError(
                f"bf16 needs avx512_bf16 (vdpbf16ps) and {where} lacks it; "
                "use int8 or fp32 on this target"
            )
        raise TargetError(
            f"bf16 kernels exist for x86 CPUs with avx512_bf16 only; {where} is not one (use fp32)"
        )
    if fp16_lanes(spec):
        return precision
    if _is_x86(target):
        raise TargetError(
            f"fp16 kernels exist for ARM CPUs with fp16 multiply-add into fp32 (fmlal) and CUDA "
            f"GPUs with tensor cores; {where} is an x86 CPU (use int8 or fp32 there, or bf16 "
            "where it has avx512_bf16)"
        )
    if _is_aarch64(target):
        raise TargetError(
            f"fp16 on ARM needs the widening half-precision multiply-add (fmlal, FEAT_FHM: "
            f"+fp16fml, mandatory from ARMv8.4) and {where} lacks it; use --target arm84 for a "
            "core that has it (Neoverse V1/N2, Graviton3, Cortex-A510/A710 and later), or int8 "
            "or fp32"
        )
    raise TargetError(
        f"fp16 kernels exist for ARM CPUs with FEAT_FHM and CUDA GPUs with tensor cores; "
        f"{where} is neither (use fp32)"
    )


def with_precision(spec: TargetSpec, precision: str) -> TargetSpec:
    """``spec`` for kernels of ``precision``: its key (and so its tuning database directory)
    gets the precision appended, except fp32's, which keeps the key databases already use."""
    if precision == DEFAULT_PRECISION:
        return spec
    return dataclasses.replace(spec, key=f"{spec.key}-{precision}")
