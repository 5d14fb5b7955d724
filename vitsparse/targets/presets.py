"""Compilation targets as data: a table of presets and one function that resolves them.

A preset is a target-dict template plus a tuning-database key template. Values that depend on
the machine (its LLVM CPU name, core count, SIMD level) or on the caller (the CUDA arch) are
placeholders, filled in by :func:`resolve_target` from a :class:`HostInfo`. Everything that
follows from the target itself (device type, schedule family, cross compiler, whether this
machine can run the result) is derived the same way for presets and for raw target dicts.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vitsparse._tvm import Target, tvm
from vitsparse.errors import TargetError
from vitsparse.targets.host import HostInfo, detect_host, normalise_isa

DEFAULT_CUDA_ARCH = "sm_80"
"""Ampere. nvcc 13 compiles sm_75 and newer; ``-arch sm_80`` also embeds compute_80 PTX, which
the driver JIT-compiles for newer GPUs (H100/H200), so one artifact runs on A100 and later."""

_CUDA_ARCH_RE = re.compile(r"sm_\d{2,3}[af]?")


class _Fill(enum.Enum):
    """Placeholders in a preset's target template."""

    HOST_CPU = "host LLVM CPU name"
    HOST_CORES = "host physical core count"
    CUDA_ARCH = "CUDA arch"


@dataclass(frozen=True)
class _Preset:
    description: str
    target: Mapping[str, Any]
    key: str  # str.format template over host/simd/cores/arch fields
    host: Mapping[str, Any] | None = None  # host target template (device targets only)
    native_isa: str | None = None  # the preset describes this machine; refuse other hosts


_HOST_LLVM = {"kind": "llvm", "mcpu": _Fill.HOST_CPU}

# LLVM fast-math flags for the CPU presets: reassociation lets LLVM vectorise the row
# reductions (softmax, layernorm) whose lengths (197, 577 tokens) are not a multiple of the
# vector width, contraction fuses multiply-adds. NaN/inf semantics are kept (no nnan/ninf).
# The compiled models stay within 1e-4 of PyTorch (tests/test_pipeline.py).
_FAST_MATH = {"fast-math-reassoc": True, "fast-math-contract": True, "fast-math-nsz": True}

PRESETS: Mapping[str, _Preset] = {
    "x86": _Preset(
        description="this x86-64 machine: LLVM for its CPU, all physical cores",
        target={
            "kind": "llvm",
            "mcpu": _Fill.HOST_CPU,
            "num-cores": _Fill.HOST_CORES,
            **_FAST_MATH,
        },
        key="x86-{cpu}-{simd}-{cores}c",
        native_isa="x86_64",
    ),
    # mcpu 'generic' rather than 'cortex-a72': the artifact must run on any ARMv8-A core with
    # NEON (Cortex-A53/A72/A76, Neoverse, Graviton). 'cortex-a72' adds no instructions over
    # armv8-a (+crc only), it changes LLVM's scheduling model, a choice we could not validate
    # since ARM runs here are emulated. A known board is better described by a target dict.
    "arm": _Preset(
        description="64-bit ARM Linux with NEON (cross-compiled with aarch64-linux-gnu-g++)",
        target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mattr": ["+neon"],
            "mcpu": "generic",
            **_FAST_MATH,
        },
        key="arm-aarch64-neon",
    ),
    # The ARMv8.2-A extensions the reduced precisions need, as mattr flags on the same generic
    # CPU: the dot product (sdot, int8) and half-precision arithmetic (fp16). Optional in v8.2,
    # present on Cortex-A55/A75/A76 and later, Neoverse N1/V1, Graviton2/3 and the Raspberry Pi 5.
    "arm82": _Preset(
        description="64-bit ARMv8.2-A Linux with NEON, dot product and fp16 arithmetic (int8 "
        "runs on sdot; fp16 kernels need arm84's fmlal)",
        target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mattr": ["+neon", "+v8.2a", "+dotprod", "+fullfp16"],
            "mcpu": "generic",
            **_FAST_MATH,
        },
        key="arm-aarch64-v82-dotprod",
    ),
    # ARMv8.4-A makes the dot product and, with fp16, the widening half-precision multiply-add
    # (FEAT_FHM: fmlal, fp16 products summed in fp32) mandatory: Neoverse V1/N2/V2 (Graviton3/4),
    # Cortex-A510/A710/X2 and later, Apple M1 and later. fp16 needs FHM (ARMv8.2's fp16 fmla
    # rounds every sum to fp16).
    "arm84": _Preset(
        description="64-bit ARMv8.4-A Linux with NEON, dot product and fp16 multiply-add into "
        "fp32 (fp16 runs on fmlal, int8 on sdot)",
        target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mattr": ["+neon", "+v8.4a", "+dotprod", "+fullfp16", "+fp16fml"],
            "mcpu": "generic",
            **_FAST_MATH,
        },
        key="arm-aarch64-v84-fp16fml",
    ),
    "cuda": _Preset(
        description="NVIDIA GPU (arch from cuda_arch, default sm_80), host code for this machine",
        target={"kind": "cuda", "arch": _Fill.CUDA_ARCH},
        host=_HOST_LLVM,
        key="cuda-{arch}",
    ),
}


@dataclass(frozen=True)
class _Kind:
    device_type: str
    schedule_family: str
    device_compiler: str | None


# What a target kind implies. A kind missing here has no runtime/schedules in vitsparse.
_KINDS: Mapping[str, _Kind] = {
    "llvm": _Kind(device_type="cpu", schedule_family="cpu", device_compiler=None),
    "cuda": _Kind(device_type="cuda", schedule_family="gpu", device_compiler="nvcc"),
}

# Linker for host code of a given ISA when this machine has another ISA.
_CROSS_COMPILERS: Mapping[str, str] = {
    "aarch64": "aarch64-linux-gnu-g++",
    "x86_64": "x86_64-linux-gnu-g++",
}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved compilation target and everything vitsparse derives from it.

    Equality and hashing ignore ``target`` (TVM targets compare by identity); ``key`` pins it.
    """

    name: str
    target: Target = field(compare=False)
    device_type: str
    schedule_family: str
    cross_compiler: str | None
    runs_locally: bool
    key: str
    device_compiler: str | None = None

    @property
    def device(self):
        """The TVM device artifacts for this target run on (device 0)."""
        return tvm.runtime.device(self.device_type, 0)

    def to_json(self) -> dict:
        """JSON-serialisable form; ``target`` is TVM's canonical dict (host nested)."""
        return {
            "name": self.name,
            "target": json.loads(str(self.target)),
            "device_type": self.device_type,
            "schedule_family": self.schedule_family,
            "cross_compiler": self.cross_compiler,
            "device_compiler": self.device_compiler,
            "runs_locally": self.runs_locally,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TargetSpec:
        """Inverse of :meth:`to_json`; ``runs_locally`` is re-derived for this machine."""
        missing = sorted({"name", "target", "key"} - set(data))
        if missing:
            raise TargetError(f"target spec JSON lacks {missing}; it needs name, target, key")
        return _spec_from_target(data["name"], _make_target(data["target"]), data["key"], None)


def list_presets() -> list[str]:
    """Names accepted by :func:`resolve_target`."""
    return sorted(PRESETS)


def resolve_target(
    spec: str | Mapping[str, Any] | TargetSpec,
    *,
    cuda_arch: str | None = None,
    host: HostInfo | None = None,
) -> TargetSpec:
    """Turn a preset name, a target dict (or its JSON string) or a TargetSpec into a TargetSpec.

    Parameters
    ----------
    spec
        A preset name from :func:`list_presets` (case-insensitive), a TVM target dict such as
        ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}`` (named ``'custom'``), the JSON
        text of such a dict, or an already resolved TargetSpec (returned unchanged).
    cuda_arch
        ``sm_XX`` for CUDA targets (default ``sm_80``); an error for other targets.
    host
        Facts about the compiling machine; :func:`detect_host` when omitted. Given a HostInfo
        the function is pure.
    """
    if cuda_arch is not None and not _CUDA_ARCH_RE.fullmatch(cuda_arch):
        raise TargetError(
            f"cuda_arch {cuda_arch!r} is not a CUDA arch; expected 'sm_' and the compute "
            f"capability digits, e.g. 'sm_75', 'sm_80', 'sm_89', 'sm_90'"
        )
    if isinstance(spec, TargetSpec):
        if cuda_arch is not None and _arch_of(spec.target) != cuda_arch:
            raise TargetError(
                f"cuda_arch {cuda_arch!r} conflicts with the resolved target {spec.key!r}"
            )
        return spec
    host = host if host is not None else detect_host()
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise TargetError(f"target JSON {spec!r} does not parse: {err}") from None
    if isinstance(spec, str):
        return _resolve_preset(spec, cuda_arch, host)
    if isinstance(spec, Mapping):
        return _resolve_dict(spec, cuda_arch, host)
    raise TargetError(
        f"target must be a preset name {list_presets()}, a target dict or its JSON; "
        f"got {type(spec).__name__}"
    )


def _resolve_preset(name: str, cuda_arch: str | None, host: HostInfo) -> TargetSpec:
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise TargetError(
            f"unknown target preset {name!r}; presets are {list_presets()} "
            "(or pass a TVM target dict)"
        )
    name = name.strip().lower()
    if preset.native_isa is not None and preset.native_isa != host.isa:
        raise TargetError(
            f"preset {name!r} describes this machine's {preset.native_isa} CPU, but this host "
            f"is {host.isa}; pass a target dict with an explicit mtriple/mcpu instead"
        )
    is_cuda = preset.target["kind"] == "cuda"
    if cuda_arch is not None and not is_cuda:
        raise TargetError(f"cuda_arch {cuda_arch!r} applies to the 'cuda' preset, not {name!r}")
    values = {
        _Fill.HOST_CPU: host.cpu_name,
        _Fill.HOST_CORES: host.physical_cores,
        _Fill.CUDA_ARCH: cuda_arch or DEFAULT_CUDA_ARCH,
    }
    target = _make_target(
        _fill(preset.target, values), _fill(preset.host, values) if preset.host else None
    )
    key = preset.key.format(
        cpu=host.cpu_name,
        simd=host.simd,
        cores=host.physical_cores,
        arch=values[_Fill.CUDA_ARCH],
    )
    return _spec_from_target(name, target, key, host)


def _resolve_dict(config: Mapping[str, Any], cuda_arch: str | None, host: HostInfo) -> TargetSpec:
    kind = config.get("kind")
    if kind is None:
        raise TargetError(
            f"target dict {dict(config)!r} has no 'kind'; supported kinds are {sorted(_KINDS)}"
        )
    if kind not in _KINDS:
        raise TargetError(f"target kind {kind!r} is not supported; use one of {sorted(_KINDS)}")
    config = dict(config)
    if kind == "cuda":
        arch = config.get("arch")
        if arch is not None and cuda_arch is not None and arch != cuda_arch:
            raise TargetError(f"cuda_arch {cuda_arch!r} conflicts with the dict's arch {arch!r}")
        config["arch"] = arch or cuda_arch or DEFAULT_CUDA_ARCH
        if not _CUDA_ARCH_RE.fullmatch(str(config["arch"])):
            raise TargetError(f"target arch {config['arch']!r} is not a CUDA arch like 'sm_80'")
        config.setdefault("host", {"kind": "llvm", "mcpu": host.cpu_name})
    elif cuda_arch is not None:
        raise TargetError(f"cuda_arch {cuda_arch!r} applies to CUDA targets, not kind {kind!r}")
    target = _make_target(config)
    return _spec_from_target("custom", target, _custom_key(target), host)


def _spec_from_target(name: str, target: Target, key: str, host: HostInfo | None) -> TargetSpec:
    """Derive device/schedule/toolchain facts from a target; ``host`` None = this machine."""
    kind = _KINDS.get(target.kind.name)
    if kind is None:
        raise TargetError(
            f"target kind {target.kind.name!r} is not supported; use one of {sorted(_KINDS)}"
        )
    host_isa = host.isa if host is not None else normalise_isa(platform.machine())
    code_target = target.host if target.host is not None else target
    isa = _isa_of(code_target, host_isa)
    cross = None
    if isa != host_isa:
        cross = _CROSS_COMPILERS.get(isa)
        if cross is None:
            raise TargetError(
                f"no cross compiler known for {isa!r} (mtriple {_attr(code_target, 'mtriple')!r}"
                f"); supported: {sorted(_CROSS_COMPILERS)}"
            )
    if kind.device_type == "cpu":
        runs_locally = cross is None
    else:
        gpu = host.has_cuda_gpu if host is not None else bool(tvm.cuda(0).exist)
        runs_locally = cross is None and gpu
    return TargetSpec(
        name=name,
        target=target,
        device_type=kind.device_type,
        schedule_family=kind.schedule_family,
        cross_compiler=cross,
        runs_locally=runs_locally,
        key=_safe_key(key),
        device_compiler=kind.device_compiler,
    )


def with_cores(spec: TargetSpec, cores: int) -> TargetSpec:
    """``spec`` with its target's ``num-cores`` set (MetaSchedule needs it to tune a CPU target;
    the ``arm`` preset leaves it to the board)."""
    config = json.loads(str(spec.target))
    config["num-cores"] = int(cores)
    return dataclasses.replace(spec, target=_make_target(config))


def _make_target(config: Mapping[str, Any] | str, host: Mapping[str, Any] | None = None) -> Target:
    try:
        return Target(dict(config) if isinstance(config, Mapping) else config, host=host)
    except (ValueError, TypeError, RuntimeError) as err:
        raise TargetError(f"invalid target {config!r}: {err}") from None


def _fill(template: Mapping[str, Any], values: Mapping[_Fill, Any]) -> dict[str, Any]:
    return {k: values[v] if isinstance(v, _Fill) else v for k, v in template.items()}


def _attr(target: Target, name: str) -> Any:
    value = target.attrs.get(name)
    return None if value is None else str(value)


def _arch_of(target: Target) -> str | None:
    return _attr(target, "arch")


def _isa_of(target: Target, host_isa: str) -> str:
    """ISA the host-side code of ``target`` runs on (LLVM targets without mtriple: this host)."""
    triple = _attr(target, "mtriple")
    return normalise_isa(triple.split("-")[0]) if triple else host_isa


def _custom_key(target: Target) -> str:
    canonical = json.dumps(json.loads(str(target)), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    detail = _arch_of(target) or _attr(target, "mcpu") or _attr(target, "mtriple") or "default"
    return f"custom-{target.kind.name}-{detail}-{digest}"


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", key).strip("-.")
