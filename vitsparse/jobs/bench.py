"""The bench job: side-by-side latency of one ViT under several runtimes: PyTorch eager, ONNX
Runtime, TVM.

Every runtime gets the same seeded random input, the same thread count and the same timing
scheme (``repeat`` samples, each the mean of ``number`` runs, after a warm-up); the runtimes on
this machine's CPU take their samples in alternating rounds, with a pause between runtimes so
that one's idle thread pool cannot slow the next. Every output is checked against a reference:
PyTorch's output, or ONNX Runtime's when the model came in as an ONNX file. With a pruning
plan, two more rows: the plan applied to the PyTorch model (torch-pruned) and the pruned TVM
build (tvm-pruned), both checked against torch-pruned's output (for an ONNX file: ONNX
Runtime's on the file with the pruned blocks zeroed).

A runtime is one entry of `vitsparse.jobs.bench_runtimes.RUNNERS` (name -> function of the
shared ``Session``); a new row is a new function there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitsparse._versions import collect_versions
from vitsparse.data.digits import DIGITS_MODEL
from vitsparse.devices import Timing, available_cores
from vitsparse.frontend import RANDOM_WEIGHTS_SEED, import_model
from vitsparse.jobs._inputs import resolve_inputs, source_label
from vitsparse.jobs.bench_report import (
    ONNXRUNTIME,
    PRUNED_RUNTIMES,
    RUNTIMES,
    TORCH_EAGER,
    TVM_DENSE,
    BenchReport,
)
from vitsparse.jobs.bench_runtimes import (
    RUNNERS,
    masked_onnx_output,
    pruned_torch_model,
    reference,
    torch_output,
)
from vitsparse.jobs.bench_session import Contender, Progress, Session, time_alternating
from vitsparse.plan import PruningPlan, load_plan
from vitsparse.pruning.onnx_masks import validate_onnx_plan
from vitsparse.targets import host_info

DEFAULT_RUNTIMES = (TORCH_EAGER, ONNXRUNTIME, TVM_DENSE)


def bench(
    source,
    *,
    target: str | Mapping[str, Any] = "x86",
    batch: int = 1,
    threads: int | None = None,
    repeat: int = 10,
    number: int = 5,
    warmup: int = 3,
    db: str | Path | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights_seed: int = RANDOM_WEIGHTS_SEED,
    cuda_arch: str | None = None,
    include: Sequence[str] | None = None,
    seed: int = 0,
    plan: PruningPlan | str | Path | None = None,
    energy_seconds: float = 3.0,
    rpc=None,
    precision: str = "fp32",
    calib: str | Path | None = None,
    calib_size: int = 64,
    progress: Progress | None = print,
) -> BenchReport:
    """Time ``source`` under each runtime in ``include`` and check their outputs.

    Parameters
    ----------
    source
        A timm name, a ``torch.nn.Module``, or an ``.onnx`` path (then onnxruntime runs the file
        itself and is the numerical reference; torch-eager is reported as not run).
    target
        The TVM target (preset name or target dict). PyTorch and ONNX Runtime run on this
        machine's CPU; a TVM target that cannot run here is compiled and reported as not run.
    threads
        Threads for every runtime (default: every core this process may use).
    repeat, number, warmup
        ``repeat`` timing samples, each the mean of ``number`` runs, after ``warmup`` runs.
    db
        Tuning-database root for the TVM build.
    include
        Runtimes to run, in order; default :data:`DEFAULT_RUNTIMES`, then :data:`PRUNED_RUNTIMES`
        when ``plan`` is given.
    plan
        A ``PruningPlan`` or the path of its JSON file, for the pruned rows: torch-pruned (the
        plan applied to the PyTorch model) and tvm-pruned (compiled with the plan). Their errors
        are measured against torch-pruned's output. The plan must match the model's weights.
    energy_seconds
        Where the device of a row has a power meter (`vitsparse.devices.meters`: RAPL for the
        CPU, NVML for a CUDA GPU), that row also gets ``energy_j`` per inference and ``watts``,
        from a window of repeated runs at least this long; 0 skips it. Without a meter they stay
        None and the report says why.
    precision, calib, calib_size
        The TVM rows' precision (`vitsparse.targets.precision`); int8 calibrates on
        ``calib_size`` images of ``calib``. An int8, bf16 or fp16 row's error is measured against
        the PyTorch model of the same computation (`vitsparse.plan.quantize.reference_model`).
    rpc
        A `vitsparse.devices.RpcDevice`: the TVM rows are built here and measured on a
        device of its key through the tracker (uploaded, then ``time_evaluator``); PyTorch and
        ONNX Runtime still run on this machine, as the numerical reference.
    progress
        Called with one line per step (``None`` for silence).

    Raises
    ------
    ValueError
        An unknown runtime in ``include``, a pruned runtime without ``plan``, or a non-positive
        count.
    VitsparseError
        The model, target, database or plan cannot be used (raised before any timing starts).
    """
    if include is None:
        include = DEFAULT_RUNTIMES + (PRUNED_RUNTIMES if plan is not None else ())
    include = _check_include(include)
    pruned_rows = [name for name in include if name in PRUNED_RUNTIMES]
    if pruned_rows and plan is None:
        raise ValueError(f"runtime(s) {pruned_rows} need a pruning plan; pass plan=")
    threads = threads if threads is not None else available_cores()
    for name, value in (("batch", batch), ("threads", threads), ("repeat", repeat)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if number < 1 or warmup < 0:
        raise ValueError(f"number must be >= 1 and warmup >= 0, got {number}, {warmup}")
    say = progress or (lambda _line: None)

    # A bad target, database, device or plan file fails now, not after the other runtimes.
    tvm_rows = any(name.startswith("tvm-") for name in include)
    inputs = resolve_inputs(
        target=target,
        cuda_arch=cuda_arch,
        db=db if tvm_rows else None,
        rpc=rpc if tvm_rows else None,
        precision=precision,
        calib=calib,
        calib_size=calib_size,
    )
    inputs = dataclasses.replace(inputs, plan=load_plan(plan), rpc=rpc)
    say(f"[bench] importing {source_label(source)} (batch {batch}) ...")
    imported = import_model(
        source, batch=batch, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    onnx_plan = plan is not None and imported.torch_model is None
    if onnx_plan:
        validate_onnx_plan(inputs.plan, imported)
    pruned_model = pruned_torch_model(imported, inputs.plan) if plan and not onnx_plan else None
    x = np.random.default_rng(seed).standard_normal(imported.input_shape, dtype=np.float32)
    spec = inputs.spec
    with contextlib.ExitStack() as stack:
        session = Session(
            imported=imported,
            x=x,
            threads=threads,
            timing=Timing(repeat, number, warmup),
            inputs=inputs,
            say=say,
            tmpdir=Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitsparse-"))),
            pruned_model=pruned_model,
            energy_seconds=energy_seconds,
        )
        session.reference_name, session.reference = reference(session)
        if pruned_model is not None:
            session.pruned_reference = torch_output(session, pruned_model)
        elif onnx_plan:  # ONNX Runtime on the file with the pruned blocks zeroed
            session.pruned_reference = masked_onnx_output(session)
        prepared = [RUNNERS[name](session) for name in include]
        timed = iter(
            time_alternating([p for p in prepared if isinstance(p, Contender)], session.timing, say)
        )
        rows = tuple(next(timed) if isinstance(p, Contender) else p for p in prepared)
    return BenchReport(
        model=imported.model_id,
        weights=_weights_label(source, checkpoint, pretrained, weights_seed),
        target=spec.to_json(),
        batch=batch,
        threads=threads,
        input_shape=tuple(imported.input_shape),
        reference=session.reference_name,
        repeat=repeat,
        number=number,
        versions=collect_versions(),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=host_info(),
        rows=rows,
        meters=session.meter_notes(),
        precision=precision,
    )


KNOWN_RUNTIMES: tuple[str, ...] = RUNTIMES


def _check_include(include: Sequence[str]) -> tuple[str, ...]:
    if isinstance(include, str):
        include = (include,)
    unknown = [name for name in include if name not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; known runtimes are {list(KNOWN_RUNTIMES)}")
    if not include:
        raise ValueError(f"include names no runtime; known runtimes are {list(KNOWN_RUNTIMES)}")
    return tuple(dict.fromkeys(include))


def _weights_label(source, checkpoint, pretrained: bool, seed: int) -> str:
    if checkpoint is not None:
        return f"checkpoint {Path(checkpoint).name}"
    if pretrained:
        return "pretrained"
    if isinstance(source, str | Path) and str(source).lower().endswith(".onnx"):
        return "ONNX file"
    if source == DIGITS_MODEL:
        return "trained-here"
    return f"seed-{seed} random" if isinstance(source, str) else "module"
