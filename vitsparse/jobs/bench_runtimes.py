"""The runtimes a bench compares, one function each (name -> function of the shared `Session`
in `RUNNERS`; a new row is a new function there): PyTorch eager (on the CPU, or on the GPU a
CUDA target runs on), ONNX Runtime, and the TVM builds, dense and pruned.

A runtime that runs on this machine's CPU comes back as a `Contender` (one call, and how its
row is made); `time_alternating` times them all in alternating rounds, pausing between
runtimes so that one's idle thread pool cannot slow the next. The others (a GPU, a device
behind an RPC tracker, via `vitsparse.devices.measure`) come back as finished rows."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from vitsparse._tvm import relax, tvm
from vitsparse._versions import version_of
from vitsparse.devices import Timing, measure, set_num_threads, time_call
from vitsparse.devices.measure import LatencyStats, first_output
from vitsparse.devices.meters import measure_energy, meter_for
from vitsparse.errors import PlanError, TargetError
from vitsparse.jobs.artifact import sparsity_summary
from vitsparse.jobs.bench_report import (
    ONNXRUNTIME,
    STATUS_OK,
    TORCH_EAGER,
    TORCH_PRUNED,
    TVM_DENSE,
    TVM_PRUNED,
    BenchRow,
)
from vitsparse.jobs.compile import compile_resolved
from vitsparse.plan import PruningPlan, apply_plan_to_torch
from vitsparse.pruning import onnx_masks

ONNX_OPSET = 18

Progress = Callable[[str], None]


@dataclass
class Session:
    """What every runtime of one bench call shares (one input, one reference, one timing)."""

    imported: Any  # ImportedModel
    x: np.ndarray
    threads: int
    timing: Timing
    inputs: Any  # Inputs: the target, database, plan and device, resolved once
    say: Progress
    tmpdir: Path
    reference_name: str = TORCH_EAGER
    reference: np.ndarray | None = None
    pruned_model: Any = None  # torch.nn.Module with the plan's masks applied
    pruned_reference: np.ndarray | None = None  # its output: the pruned rows' reference
    energy_seconds: float = 3.0
    _onnx: tuple[Path, str] | None = field(default=None, repr=False)
    _meters: dict = field(default_factory=dict, repr=False)

    @property
    def spec(self):
        return self.inputs.spec

    @property
    def plan(self) -> PruningPlan | None:
        return self.inputs.plan

    @property
    def rpc(self):
        return self.inputs.rpc

    def meter(self, device: str):
        """The power meter of ``device`` (made once; it may be unavailable)."""
        if device not in self._meters:
            self._meters[device] = meter_for(device)
        return self._meters[device]

    def meter_notes(self) -> dict[str, str]:
        if self.energy_seconds <= 0:
            return {}
        notes = {
            device: meter.name if meter.available else f"unavailable: {meter.reason}"
            for device, meter in self._meters.items()
        }
        if self.rpc is not None:
            notes[f"rpc:{self.rpc.key}"] = "unavailable: no meter is read over RPC"
        return notes

    def energy(self, device: str, run: Callable[[], object]) -> tuple[float | None, float | None]:
        """(joules per run, mean watts) over a window of ``run()`` calls, or (None, None)."""
        if self.energy_seconds <= 0 or not self.meter(device).available:
            return None, None
        self.say(f"[bench] measuring energy on {device} ({self.energy_seconds:g} s) ...")
        reading = measure_energy(run, self.meter(device), min_seconds=self.energy_seconds)
        return reading.energy_j, reading.watts

    def ok_row(
        self, runtime, out, latency, *, detail, pruned=False, device="cpu", repeats=None, run=None
    ):
        """The row of a runtime that ran: its latency, its error against the reference, and its
        energy where ``device`` has a meter (``run`` runs it once)."""
        energy_j, watts = (None, None) if run is None else self.energy(device, run)
        return BenchRow(
            runtime=runtime,
            device=device,
            status=STATUS_OK,
            latency_ms=latency,
            repeats=self.timing.repeat if repeats is None else repeats,
            max_abs_err_vs_torch=self.error(out, pruned=pruned),
            detail=detail,
            energy_j=energy_j,
            watts=watts,
        )

    def error(self, out: np.ndarray, *, pruned: bool = False) -> float:
        reference = self.pruned_reference if pruned else self.reference
        return float(np.max(np.abs(np.asarray(out, np.float32) - reference)))

    def onnx_file(self) -> tuple[Path, str]:
        """(ONNX path, how it was made): the source file, or the torch model exported once."""
        if self._onnx is None:
            if self.imported.onnx_path is not None:
                self._onnx = (Path(self.imported.onnx_path), "the source ONNX file")
            else:
                self.say(f"[bench] exporting {self.imported.model_id} to ONNX ...")
                self._onnx = _export_onnx(self.imported.torch_model, self.x, self.tmpdir)
        return self._onnx


# Between two runtimes' samples: long enough for a spinning thread pool (OpenMP's, ONNX
# Runtime's) to go to sleep before the next runtime is timed.
QUIESCE_S = 0.02


@dataclass
class Contender:
    """A runtime ready to be timed on this machine: ``call`` runs one inference (inside
    ``scope``, e.g. PyTorch's thread count), ``finish`` makes its row from its latency."""

    runtime: str
    call: Callable[[], object]
    finish: Callable[[dict], BenchRow]
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def time_alternating(contenders: list[Contender], timing: Timing, say: Progress) -> list[BenchRow]:
    """The rows of ``contenders`` timed in alternating rounds: in each of ``timing.repeat``
    rounds every runtime takes one sample (the mean of ``number`` calls), with a pause between
    runtimes so that the last one's pool sleeps (a slow spell of the machine, or a pool still
    spinning, hits them alike instead of one)."""
    if not contenders:
        return []
    say(
        f"[bench] timing {', '.join(c.runtime for c in contenders)} in {timing.repeat} "
        "alternating rounds ..."
    )
    samples: dict[str, list[float]] = {c.runtime: [] for c in contenders}
    for c in contenders:
        with c.scope():
            for _ in range(timing.warmup):
                c.call()
    for _ in range(timing.repeat):
        for c in contenders:
            with c.scope():
                start = time.perf_counter()
                for _ in range(timing.number):
                    c.call()
                samples[c.runtime].append((time.perf_counter() - start) / timing.number * 1e3)
            time.sleep(QUIESCE_S)
    return [c.finish(LatencyStats.from_ms(samples[c.runtime]).as_row()) for c in contenders]


def reference(session: Session) -> tuple[str, np.ndarray]:
    model = session.imported.torch_model
    if model is not None:
        return TORCH_EAGER, torch_output(session, model)
    run, _ = _ort_session(session)
    return ONNXRUNTIME, run()


def torch_output(session: Session, model) -> np.ndarray:
    with _torch_threads(session.threads), torch.inference_mode():
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
        with _torch_threads(session.threads), torch.inference_mode():
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
    run, made_from = _ort_session(session)
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
        return _tvm_contender(session, runtime, compiled, detail, pruned=plan is not None)
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
        max_abs_err_vs_torch=session.error(measured.output, pruned=plan is not None),
        detail=detail,
        energy_j=measured.energy_j,
        watts=measured.watts,
    )


def _tvm_contender(session: Session, runtime: str, compiled, detail: str, *, pruned: bool):
    """The compiled model on this machine's CPU, run by the Relax VM."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(compiled.executable, dev)
    arg = tvm.runtime.tensor(np.ascontiguousarray(session.x), dev)
    out = first_output(vm["main"](arg)).numpy()

    def call():
        return vm["main"](arg)

    def finish(latency):
        return session.ok_row(runtime, out, latency, detail=detail, pruned=pruned, run=call)

    return Contender(runtime, call, finish)


RUNNERS: Mapping[str, Callable[[Session], BenchRow | Contender]] = {
    TORCH_EAGER: _run_torch,
    ONNXRUNTIME: _run_onnxruntime,
    TVM_DENSE: _run_tvm_dense,
    TORCH_PRUNED: _run_torch_pruned,
    TVM_PRUNED: _run_tvm_pruned,
}


# --- helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _ort_session(session: Session) -> tuple[Callable[[], np.ndarray], str]:
    """A CPU InferenceSession on the session's ONNX file: (run, how the file was made)."""
    path, made_from = session.onnx_file()
    options = ort.SessionOptions()
    options.intra_op_num_threads = session.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort_session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {ort_session.get_inputs()[0].name: session.x}
    return (lambda: ort_session.run(None, feed)[0]), made_from


def _export_onnx(model, x: np.ndarray, outdir: Path) -> tuple[Path, str]:
    """Export ``model`` at ``x``'s shape: torch.export-based exporter, the TorchScript one if
    that fails. Returns the path and which exporter wrote it."""
    path = outdir / "model.onnx"
    example = (torch.from_numpy(x),)
    common = {"input_names": ["x"], "output_names": ["logits"], "opset_version": ONNX_OPSET}
    try:
        torch.onnx.export(model, example, str(path), dynamo=True, verbose=False, **common)
        return path, f"an ONNX export (torch.onnx dynamo exporter, opset {ONNX_OPSET})"
    except Exception as err:  # the exporter raises many types; fall back, then give up
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for stale in outdir.glob("model.onnx*"):
        stale.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(model, example, str(path), dynamo=False, **common)
    return path, (
        f"an ONNX export (TorchScript exporter, opset {ONNX_OPSET}; the dynamo exporter "
        f"failed: {first})"
    )
