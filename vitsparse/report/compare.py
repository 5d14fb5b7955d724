"""Side-by-side latency of one ViT under several runtimes: PyTorch eager, ONNX Runtime, TVM.

Every runtime gets the same seeded random input, the same thread count and the same timing
scheme as TVM's time_evaluator (``repeat`` samples, each the mean of ``number`` runs, after a
warm-up), and its output is checked against a reference: PyTorch's output, or ONNX Runtime's
when the model came in as an ONNX file. With a pruning plan, two more rows: the plan applied to
the PyTorch model (torch-pruned) and the pruned TVM build (tvm-pruned), both checked against
torch-pruned's output.

A runtime is one entry of ``_RUNNERS`` (name -> function of the shared ``_Session``); a new row
is a new function there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitsparse.report.table import (
    ONNXRUNTIME,
    PRUNED_RUNTIMES,
    STATUS_OK,
    TORCH_EAGER,
    TORCH_PRUNED,
    TVM_DENSE,
    TVM_PRUNED,
    BenchReport,
    BenchRow,
)

if TYPE_CHECKING:
    from vitsparse.plan import PruningPlan

DEFAULT_RUNTIMES = (TORCH_EAGER, ONNXRUNTIME, TVM_DENSE)
ONNX_OPSET = 18

Progress = Callable[[str], None]


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
    cuda_arch: str | None = None,
    include: Sequence[str] | None = None,
    seed: int = 0,
    plan: PruningPlan | str | Path | None = None,
    energy_seconds: float = 3.0,
    rpc=None,
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
        Threads for every runtime (default ``os.cpu_count()``).
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
        Where the device of a row has a power meter (`vitsparse.targets.meters`: RAPL for the
        CPU, NVML for a CUDA GPU), that row also gets ``energy_j`` per inference and ``watts``,
        from a window of repeated runs at least this long; 0 skips it. Without a meter they stay
        None and the report says why.
    rpc
        A `vitsparse.targets.rpc.RpcDevice`: the TVM rows are built here and measured on a
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
    threads = threads if threads is not None else (os.cpu_count() or 1)
    for name, value in (("batch", batch), ("threads", threads), ("repeat", repeat)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if number < 1 or warmup < 0:
        raise ValueError(f"number must be >= 1 and warmup >= 0, got {number}, {warmup}")
    say = progress or (lambda _line: None)

    from vitsparse.compiler import open_database
    from vitsparse.frontend import import_model
    from vitsparse.plan import PruningPlan
    from vitsparse.targets import resolve_target

    spec = resolve_target(target, cuda_arch=cuda_arch)
    if any(name.startswith("tvm-") for name in include):
        open_database(db, spec)  # a bad database fails now, not after the other runtimes
        if rpc is not None:
            rpc.check()  # so does an unreachable tracker or an unknown key
    if plan is not None and not isinstance(plan, PruningPlan):
        plan = PruningPlan.load(plan)  # so does a bad plan file
    label = source if isinstance(source, str | Path) else type(source).__name__
    say(f"[bench] importing {label} (batch {batch}) ...")
    imported = import_model(source, batch=batch, checkpoint=checkpoint, pretrained=pretrained)
    pruned_model = _pruned_torch_model(imported, plan) if plan is not None else None
    x = np.random.default_rng(seed).standard_normal(imported.input_shape, dtype=np.float32)
    with contextlib.ExitStack() as stack:
        session = _Session(
            imported=imported,
            x=x,
            threads=threads,
            timing=_Timing(repeat, number, warmup),
            spec=spec,
            db=db,
            say=say,
            tmpdir=Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitsparse-"))),
            plan=plan,
            pruned_model=pruned_model,
            energy_seconds=energy_seconds,
            rpc=rpc,
        )
        session.reference_name, session.reference = _reference(session)
        if pruned_model is not None:
            session.pruned_reference = _torch_output(session, pruned_model)
        rows = tuple(_RUNNERS[name](session) for name in include)
    return BenchReport(
        model=imported.model_id,
        weights=_weights_label(source, checkpoint, pretrained),
        target=spec.to_json(),
        batch=batch,
        threads=threads,
        input_shape=tuple(imported.input_shape),
        reference=session.reference_name,
        repeat=repeat,
        number=number,
        versions=_versions(),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=host_info(),
        rows=rows,
        meters=session.meter_notes(),
    )


def host_info() -> dict[str, Any]:
    """This machine's CPU: model name, LLVM name, SIMD level, core and logical CPU counts."""
    from vitsparse.targets import detect_host

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


# --- runtimes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Timing:
    repeat: int
    number: int
    warmup: int

    def measure(self, fn: Callable[[], object]) -> dict[str, float]:
        """Median/min/max ms over ``repeat`` samples, each the mean of ``number`` calls."""
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeat):
            start = time.perf_counter()
            for _ in range(self.number):
                fn()
            samples.append((time.perf_counter() - start) / self.number * 1e3)
        return _stats(samples)


@dataclass
class _Session:
    """What every runtime of one bench call shares."""

    imported: Any  # ImportedModel
    x: np.ndarray
    threads: int
    timing: _Timing
    spec: Any  # TargetSpec
    db: str | Path | None
    say: Progress
    tmpdir: Path
    reference_name: str = TORCH_EAGER
    reference: np.ndarray | None = None
    plan: Any = None  # PruningPlan
    pruned_model: Any = None  # torch.nn.Module with the plan's masks applied
    pruned_reference: np.ndarray | None = None  # its output: the pruned rows' reference
    energy_seconds: float = 3.0
    rpc: Any = None  # RpcDevice: the TVM rows run there
    _onnx: tuple[Path, str] | None = field(default=None, repr=False)
    _meters: dict = field(default_factory=dict, repr=False)

    def meter(self, device: str):
        """The power meter of ``device`` (made once; it may be unavailable)."""
        from vitsparse.targets.meters import meter_for

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
        from vitsparse.targets.meters import measure

        if self.energy_seconds <= 0 or not self.meter(device).available:
            return None, None
        self.say(f"[bench] measuring energy on {device} ({self.energy_seconds:g} s) ...")
        reading = measure(run, self.meter(device), min_seconds=self.energy_seconds)
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


def _reference(session: _Session) -> tuple[str, np.ndarray]:
    model = session.imported.torch_model
    if model is not None:
        return TORCH_EAGER, _torch_output(session, model)
    with _ort_session(session) as (run, _):
        return ONNXRUNTIME, run()


def _torch_output(session: _Session, model) -> np.ndarray:
    import torch

    with _torch_threads(session.threads), torch.inference_mode():
        return model(torch.from_numpy(session.x)).numpy()


def _pruned_torch_model(imported, plan):
    """The PyTorch model with the plan's masks applied (PlanError if the plan does not fit)."""
    from vitsparse.errors import PlanError
    from vitsparse.plan import apply_plan_to_torch

    if imported.torch_model is None:
        raise PlanError(
            "a pruning plan needs the PyTorch model (its reference output and weights hash); "
            "ONNX input has none: give the timm name (and --checkpoint) instead"
        )
    return apply_plan_to_torch(imported.torch_model, plan)


def _run_torch(session: _Session) -> BenchRow:
    model = session.imported.torch_model
    if model is None:
        return BenchRow.not_run(TORCH_EAGER, "cpu", "ONNX input has no PyTorch model")
    return _time_torch(session, TORCH_EAGER, model, f"torch {_version('torch')}, inference_mode")


def _run_torch_pruned(session: _Session) -> BenchRow:
    plan = session.plan
    detail = (
        f"torch {_version('torch')}, inference_mode; weights masked by the plan ({plan.method}, "
        f"{plan.budget.get('blocks')} blocks, mean density {plan.mean_density:.3f}); the "
        "reference of the pruned rows"
    )
    return _time_torch(session, TORCH_PRUNED, session.pruned_model, detail, pruned=True)


def _time_torch(
    session: _Session, runtime: str, model, detail: str, *, pruned: bool = False
) -> BenchRow:
    import torch

    if session.spec.device_type == "cuda" and session.rpc is None and torch.cuda.is_available():
        return _time_torch_cuda(session, runtime, model, detail, pruned=pruned)
    session.say(f"[bench] timing {runtime} ({session.threads} threads) ...")
    x = torch.from_numpy(session.x)
    with _torch_threads(session.threads), torch.inference_mode():
        out = model(x).numpy()
        latency = session.timing.measure(lambda: model(x))
        return session.ok_row(
            runtime, out, latency, detail=detail, pruned=pruned, run=lambda: model(x)
        )


def _time_torch_cuda(session: _Session, runtime: str, model, detail: str, *, pruned: bool):
    """PyTorch eager on the GPU the CUDA target runs on (cuBLAS/cuDNN, TF32 off: the TVM rows
    compute in float32 too), timed with a synchronize per call."""
    import copy

    import torch

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
            latency = session.timing.measure(run)
            detail += f"; on {name} (cuBLAS/cuDNN, TF32 off)"
            return session.ok_row(
                runtime, out, latency, detail=detail, pruned=pruned, device="cuda", run=run
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_onnxruntime(session: _Session) -> BenchRow:
    with _ort_session(session) as (run, made_from):
        session.say(f"[bench] timing {ONNXRUNTIME} ({session.threads} threads) ...")
        out = run()
        latency = session.timing.measure(run)
        detail = f"onnxruntime {_version('onnxruntime')} CPUExecutionProvider on {made_from}"
        return session.ok_row(ONNXRUNTIME, out, latency, detail=detail, run=run)


def _run_tvm_dense(session: _Session) -> BenchRow:
    return _run_tvm(session, TVM_DENSE)


def _run_tvm_pruned(session: _Session) -> BenchRow:
    return _run_tvm(session, TVM_PRUNED, plan=session.plan)


def _run_tvm(session: _Session, runtime: str, plan=None) -> BenchRow:
    from vitsparse.compiler import compile_imported, set_num_threads
    from vitsparse.errors import TargetError

    spec, model_id = session.spec, session.imported.model_id
    pruned = " with the pruning plan" if plan is not None else ""
    session.say(f"[bench] compiling {model_id}{pruned} for {spec.name} ({spec.key}) ...")
    start = time.perf_counter()
    try:
        compiled = compile_imported(session.imported, target=spec, db=session.db, plan=plan)
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
    if session.rpc is not None:
        return _run_tvm_remote(session, runtime, compiled, detail, pruned=plan is not None)
    if not spec.runs_locally:
        where = "a CUDA GPU" if spec.device_type == "cuda" else "a matching CPU"
        return BenchRow.not_run(
            runtime,
            spec.device_type,
            f"target {spec.key} needs {where}; this machine cannot run it",
            detail,
        )
    if spec.device_type == "cpu":
        set_num_threads(session.threads)
    session.say(f"[bench] timing {runtime} ({session.threads} threads) ...")
    out = compiled.run(session.x)
    t = session.timing
    stats = compiled.time(session.x, repeat=t.repeat, number=t.number, warmup=t.warmup)
    latency = {"median": stats.median_ms, "min": stats.min_ms, "max": stats.max_ms}
    return session.ok_row(
        runtime,
        out,
        latency,
        detail=detail,
        pruned=plan is not None,
        device=spec.device_type,
        repeats=stats.repeats,
        run=lambda: compiled.run(session.x),
    )


def _run_tvm_remote(session: _Session, runtime: str, compiled, detail: str, *, pruned: bool):
    from vitsparse.targets.rpc import remote_run

    device = session.rpc
    session.say(f"[bench] timing {runtime} on a {device.key!r} device via {device.tracker} ...")
    t = session.timing
    result = remote_run(
        compiled, session.x, device, repeat=t.repeat, number=t.number, warmup=t.warmup
    )
    stats = _stats([s * 1e3 for s in result.seconds])
    detail += f"; measured on {result.device} via the tracker {device.tracker}"
    if result.emulated:
        detail += f" ({result.emulated}: emulated latency, not the hardware's)"
    row = session.ok_row(runtime, result.output, stats, detail=detail, pruned=pruned)
    return dataclasses.replace(row, device=result.device)


def sparsity_summary(compiled) -> str:
    """How a pruned CompiledModel's masked layers were compiled, e.g. ``"48 layers BSR, 0 dense
    (break-even measured)"``."""
    kernels = [d["kernel"] for d in compiled.sparsity_decisions]
    spec = compiled.spec
    # compiler._break_even: measured only where the target runs here (CPU); else every layer BSR
    measured = spec.runs_locally and spec.schedule_family == "cpu"
    how = "break-even measured" if measured else "break-even not measured: all masked layers BSR"
    return f"{kernels.count('bsr')} layers BSR, {kernels.count('dense')} dense ({how})"


_RUNNERS: Mapping[str, Callable[[_Session], BenchRow]] = {
    TORCH_EAGER: _run_torch,
    ONNXRUNTIME: _run_onnxruntime,
    TVM_DENSE: _run_tvm_dense,
    TORCH_PRUNED: _run_torch_pruned,
    TVM_PRUNED: _run_tvm_pruned,
}

KNOWN_RUNTIMES: tuple[str, ...] = tuple(_RUNNERS)


def _check_include(include: Sequence[str]) -> tuple[str, ...]:
    if isinstance(include, str):
        include = (include,)
    unknown = [name for name in include if name not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; known runtimes are {list(KNOWN_RUNTIMES)}")
    if not include:
        raise ValueError(f"include names no runtime; known runtimes are {list(KNOWN_RUNTIMES)}")
    return tuple(dict.fromkeys(include))


# --- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _ort_session(session: _Session) -> Iterator[tuple[Callable[[], np.ndarray], str]]:
    """A CPU InferenceSession on the session's ONNX file; yields (run, how the file was made)."""
    import onnxruntime as ort

    path, made_from = session.onnx_file()
    options = ort.SessionOptions()
    options.intra_op_num_threads = session.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort_session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {ort_session.get_inputs()[0].name: session.x}
    # The session (and its spinning worker threads) dies with the caller's `run`, before the
    # next runtime is timed.
    yield (lambda: ort_session.run(None, feed)[0]), made_from


def _export_onnx(model, x: np.ndarray, outdir: Path) -> tuple[Path, str]:
    """Export ``model`` at ``x``'s shape: torch.export-based exporter, the TorchScript one if
    that fails. Returns the path and which exporter wrote it."""
    import torch

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


def _stats(samples_ms: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples_ms, dtype=np.float64)
    return {"median": float(np.median(ms)), "min": float(ms.min()), "max": float(ms.max())}


def _weights_label(source, checkpoint, pretrained: bool) -> str:
    if checkpoint is not None:
        return f"checkpoint {Path(checkpoint).name}"
    if pretrained:
        return "pretrained"
    if isinstance(source, str | Path) and str(source).lower().endswith(".onnx"):
        return "ONNX file"
    return "random" if isinstance(source, str) else "module"


def _versions() -> dict[str, str]:
    from vitsparse import __version__

    return {
        "vitsparse": __version__,
        "tvm": _version("apache-tvm"),
        "torch": _version("torch"),
        "timm": _version("timm"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
