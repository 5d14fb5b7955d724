"""The runtimes a bench compares, one function each (name -> function of the shared `Session`
in `RUNNERS`; a new row is a new function there): PyTorch eager (on the CPU, or on the GPU a
CUDA target runs on), ONNX Runtime, the TVM builds, dense and pruned, and the peers of a TVM
build on this machine's CPU (`bench_peers`: OpenVINO, float32 and at its default precision, and
ONNX Runtime's static int8 quantization). The TVM rows compile in the bench's precision; an int8
row is checked against the PyTorch int8 model of the same scales.

A runtime that runs on this machine's CPU comes back as a `Contender` (one call, and how its
row is made); `bench_session.time_alternating` times them all in alternating rounds, pausing
between runtimes so that one's idle thread pool cannot slow the next. The others (a GPU, a device
behind an RPC tracker, via `vitsparse.devices.measure`) come back as finished rows."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch

from vitsparse._tvm import relax, tvm
from vitsparse._versions import version_of
from vitsparse.devices import measure, set_num_threads, time_call
from vitsparse.devices.measure import first_output
from vitsparse.errors import PlanError, TargetError
from vitsparse.jobs.artifact import sparsity_summary
from vitsparse.jobs.bench_peers import run_onnxruntime_int8, run_openvino, run_openvino_default
from vitsparse.jobs.bench_report import (
    ONNXRUNTIME,
    ONNXRUNTIME_INT8,
    OPENVINO,
    OPENVINO_DEFAULT,
    STATUS_OK,
    TORCH_EAGER,
    TORCH_PRUNED,
    TVM_DENSE,
    TVM_PRUNED,
    BenchRow,
)
from vitsparse.jobs.bench_session import (
    Contender,
    Session,
    ort_session,
    torch_threads,
)
from vitsparse.jobs.compile import compile_resolved
from vitsparse.plan import apply_plan_to_torch
from vitsparse.plan.quantize import quantized_layers, reference_model
from vitsparse.pruning import onnx_masks


def reference(session: Session) -> tuple[str, np.ndarray]:
    model = session.imported.torch_model
    if model is not None:
        return TORCH_EAGER, torch_output(session, model)
    run, _ = ort_session(session)
    return ONNXRUNTIME, run()


def torch_output(session: Session, model) -> np.ndarray:
    with torch_threads(session.threads), torch.inference_mode():
        return model(torch.from_numpy(session.x)).numpy()


def pruned_torch_model(imported, plan):
    """The PyTorch model with the plan's masks applied (PlanError if the plan does not fit)."""
    if imported.torch_model is None:
        raise PlanError(
            "a pruning plan needs the PyTorch model (its reference output and weights hash); "
            "ONNX input has none: give the timm name (and --checkpoint) instead"
        )
    return apply_plan_to_torch(imported.torch_model, plan)


def _run_torch(session: Session) -> BenchRow | Contender:
    model = session.imported.torch_model
    if model is None:
        return BenchRow.not_run(TORCH_EAGER, "cpu", "ONNX input has no PyTorch model")
    return _time_torch(session, TORCH_EAGER, model, f"torch {version_of('torch')}, inference_mode")


def masked_onnx_output(session: Session) -> np.ndarray:
    """ONNX Runtime's output on the source ONNX file with the plan's pruned blocks zeroed: the
    reference of the pruned rows of an ONNX model."""
    path = onnx_masks.masked_onnx(
        session.imported.onnx_path, session.plan, session.imported, session.tmpdir / "masked.onnx"
    )
    return onnx_masks.run_onnx(path, session.x)


def _run_torch_pruned(session: Session) -> BenchRow | Contender:
    if session.pruned_model is None:
        return BenchRow.not_run(
            TORCH_PRUNED,
            "cpu",
            "ONNX input has no PyTorch model; the pruned rows are checked against ONNX Runtime "
            "on the file with the pruned blocks zeroed",
        )
    plan = session.plan
    detail = (
        f"torch {version_of('torch')}, inference_mode; weights masked by the plan ({plan.method}, "
        f"{plan.budget.get('blocks')} blocks, mean density {plan.mean_density:.3f}); the "
        "reference of the pruned rows"
    )
    return _time_torch(session, TORCH_PRUNED, session.pruned_model, detail, pruned=True)


def _time_torch(
    session: Session, runtime: str, model, detail: str, *, pruned: bool = False
) -> BenchRow | Contender:
    if session.spec.device_type == "cuda" and session.rpc is None and torch.cuda.is_available():
        return _time_torch_cuda(session, runtime, model, detail, pruned=pruned)
    x = torch.from_numpy(session.x)

    @contextlib.contextmanager
    def scope():
        with torch_threads(session.threads), torch.inference_mode():
            yield

    with scope():
        out = model(x).numpy()

    def finish(latency):
        with scope():
            return session.ok_row(
                runtime, out, latency, detail=detail, pruned=pruned, run=lambda: model(x)
            )

    return Contender(runtime, lambda: model(x), finish, scope)


def _time_torch_cuda(session: Session, runtime: str, model, detail: str, *, pruned: bool):
    """PyTorch eager on the GPU the CUDA target runs on (cuBLAS/cuDNN, TF32 off: the TVM rows
    compute in float32 too), timed with a synchronize per call."""
    name = torch.cuda.get_device_name()
    session.say(f"[bench] timing {runtime} on {name} ...")
    gpu_model = copy.deepcopy(model).to("cuda").eval()
    x = torch.from_numpy(session.x).to("cuda")

    def run():
        y = gpu_model(x)
        torch.cuda.synchronize()
        return y

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = run().float().cpu().numpy()
            latency = time_call(run, session.timing).as_row()
            detail += f"; on {name} (cuBLAS/cuDNN, TF32 off)"
            return session.ok_row(
                runtime, out, latency, detail=detail, pruned=pruned, device="cuda", run=run
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_onnxruntime(session: Session) -> Contender:
    run, made_from = ort_session(session)
    out = run()
    detail = f"onnxruntime {version_of('onnxruntime')} CPUExecutionProvider on {made_from}"
    return Contender(
        ONNXRUNTIME,
        run,
        lambda latency: session.ok_row(ONNXRUNTIME, out, latency, detail=detail, run=run),
    )


def _run_tvm_dense(session: Session) -> BenchRow | Contender:
    return _run_tvm(session, TVM_DENSE)


def _run_tvm_pruned(session: Session) -> BenchRow | Contender:
    return _run_tvm(session, TVM_PRUNED, plan=session.plan)


def _run_tvm(session: Session, runtime: str, plan=None) -> BenchRow | Contender:
    spec, model_id = session.spec, session.imported.model_id
    pruned = " with the pruning plan" if plan is not None else ""
    session.say(f"[bench] compiling {model_id}{pruned} for {spec.name} ({spec.key}) ...")
    start = time.perf_counter()
    try:
        inputs = dataclasses.replace(session.inputs, plan=plan)
        compiled = compile_resolved(session.imported, inputs)
    except TargetError as err:  # no block-sparse kernels for this target family
        if plan is None:
            raise
        return BenchRow.not_run(runtime, spec.device_type, str(err))
    detail = (
        f"compiled in {time.perf_counter() - start:.1f} s, "
        f"{compiled.tuned_kernels} kernels from the tuning database"
    )
    if plan is not None:
        detail += (
            f"; {sparsity_summary(compiled)}; error vs {TORCH_PRUNED} (the same pruned weights)"
        )
    reference = None
    if compiled.precision != "fp32":
        base = session.pruned_model if plan is not None else session.imported.torch_model
        model = reference_model(base, compiled.precision, compiled.quantization)
        reference = torch_output(session, model)
        detail += (
            f"; {compiled.precision} ({len(quantized_layers(base))} layers), error vs the "
            f"PyTorch {compiled.precision} model of the same computation"
        )
    device = session.rpc
    if device is None and not spec.runs_locally:
        where = "a CUDA GPU" if spec.device_type == "cuda" else "a matching CPU"
        return BenchRow.not_run(
            runtime,
            spec.device_type,
            f"target {spec.key} needs {where}; this machine cannot run it",
            detail,
        )
    if device is None and spec.device_type == "cpu":
        set_num_threads(session.threads)
        return _tvm_contender(
            session, runtime, compiled, detail, pruned=plan is not None, reference=reference
        )
    meter, energy_seconds = None, 0.0
    if device is None:
        session.say(f"[bench] timing {runtime} ({session.threads} threads) ...")
        meter, energy_seconds = session.meter(spec.device_type), session.energy_seconds
        if meter.available and energy_seconds > 0:
            session.say(
                f"[bench] measuring energy on {spec.device_type} ({energy_seconds:g} s) ..."
            )
    else:
        session.say(f"[bench] timing {runtime} on a {device.key!r} device via {device.tracker} ...")
    measured = measure(
        compiled.executable,
        spec,
        [session.x],
        rpc=device,
        timing=session.timing,
        meter=meter,
        energy_seconds=energy_seconds,
    )
    if device is not None:
        detail += f"; measured on {measured.device} via the tracker {device.tracker}"
        if measured.emulated:
            detail += f" ({measured.emulated}: emulated latency, not the hardware's)"
    return BenchRow(
        runtime=runtime,
        device=measured.device,
        status=STATUS_OK,
        latency_ms=measured.latency.as_row(),
        repeats=measured.latency.repeats,
        max_abs_err_vs_torch=session.error(
            measured.output, pruned=plan is not None, reference=reference
        ),
        detail=detail,
        energy_j=measured.energy_j,
        watts=measured.watts,
    )


def _tvm_contender(
    session: Session, runtime: str, compiled, detail: str, *, pruned: bool, reference=None
):
    """The compiled model on this machine's CPU, run by the Relax VM."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(compiled.executable, dev)
    arg = tvm.runtime.tensor(np.ascontiguousarray(session.x), dev)
    out = first_output(vm["main"](arg)).numpy()

    def call():
        return vm["main"](arg)

    def finish(latency):
        return session.ok_row(
            runtime, out, latency, detail=detail, pruned=pruned, run=call, reference=reference
        )

    return Contender(runtime, call, finish)


RUNNERS: Mapping[str, Callable[[Session], BenchRow | Contender]] = {
    TORCH_EAGER: _run_torch,
    ONNXRUNTIME: _run_onnxruntime,
    TVM_DENSE: _run_tvm_dense,
    TORCH_PRUNED: _run_torch_pruned,
    TVM_PRUNED: _run_tvm_pruned,
    OPENVINO: run_openvino,
    OPENVINO_DEFAULT: run_openvino_default,
    ONNXRUNTIME_INT8: run_onnxruntime_int8,
}
