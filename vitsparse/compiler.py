"""Compile an imported ViT for a target and run, time and export the result.

compile_model(source, target=...) = import (frontend) -> bind weights -> pipeline (passes,
schedules: tuned records from the target's database, hand-written rules for the rest) ->
tvm.compile. The CompiledModel runs on this machine when the target does, and exports a
deployable artifact directory either way.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitsparse._tvm import relax, tvm
from vitsparse.errors import ArtifactError, PlanError, TargetError
from vitsparse.frontend import ImportedModel, import_model
from vitsparse.passes import pipeline
from vitsparse.passes.annotate_pruning import AnnotatePruning
from vitsparse.passes.block_sparsify import BlockSparsify
from vitsparse.plan import PruningPlan, load_plan, validate_plan
from vitsparse.targets import TargetSpec, export_library, resolve_target

ARTIFACT_LIBRARY = "model.so"
ARTIFACT_PARAMS = "params.npz"
ARTIFACT_MANIFEST = "manifest.json"


def set_num_threads(threads: int) -> None:
    """Size TVM's CPU thread pool (TVM otherwise follows the main thread's CPU affinity, which
    its own pinning can shrink to one core)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    # mode 1 = "big cores"; the pool is re-created with exactly `threads` workers.
    tvm.get_global_func("runtime.config_threadpool")(1, threads)


@dataclass(frozen=True)
class LatencyStats:
    """Latency of repeated runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @staticmethod
    def from_seconds(samples) -> LatencyStats:
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        return LatencyStats(float(np.median(ms)), float(ms.min()), float(ms.max()), len(ms))

    def to_json(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "repeats": self.repeats,
        }


@dataclass(frozen=True)
class KernelTime:
    """One kernel's share of an inference."""

    name: str
    ms_per_inference: float
    calls_per_inference: int

    def to_json(self) -> dict:
        return {
            "kernel": self.name,
            "ms_per_inference": self.ms_per_inference,
            "calls_per_inference": self.calls_per_inference,
        }


class CompiledModel:
    """A compiled ViT: the VM executable plus what it was made from."""

    def __init__(
        self,
        executable,
        spec: TargetSpec,
        imported: ImportedModel,
        tuned: int,
        plan: PruningPlan | None = None,
        sparsity: list | None = None,
    ):
        self.executable = executable
        self.spec = spec
        self.imported = imported
        self.tuned_kernels = tuned
        self.plan = plan
        self.sparsity_decisions = sparsity or []  # per masked layer: density, break-even, kernel
        self._vm = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.imported.input_shape

    def _device(self):
        if not self.spec.runs_locally:
            raise TargetError(
                f"target {self.spec.name!r} ({self.spec.key}) cannot run on this machine; "
                "export it with `vitsparse compile` and run it on the device"
            )
        return tvm.runtime.device(self.spec.device_type, 0)

    def _get_vm(self):
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, self._device())
        return self._vm

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch; returns the logits as a numpy array."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != tuple(self.input_shape):
            raise ValueError(f"input shape {x.shape} != compiled shape {self.input_shape}")
        out = self._get_vm()["main"](tvm.runtime.tensor(x, self._device()))
        return _first_output(out).numpy()

    def time(self, x: np.ndarray, *, repeat: int = 10, number: int = 5, warmup: int = 3):
        """Latency via the VM's time_evaluator: ``repeat`` samples of ``number`` runs each."""
        dev = self._device()
        arg = tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), dev)
        vm = self._get_vm()
        for _ in range(warmup):
            vm["main"](arg)
        timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
        return LatencyStats.from_seconds(list(timer(arg).results))

    def profile(self, x: np.ndarray, *, runs: int = 10) -> list[KernelTime]:
        """Per-kernel time of ``runs`` inferences (VM instrumentation; the timer adds a little
        overhead per call), most expensive first."""
        dev = self._device()
        arg = tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), dev)
        vm = relax.VirtualMachine(self.executable, dev)
        vm["main"](arg)
        totals: dict[str, list[float]] = {}
        started: dict[str, float] = {}

        def instrument(_func, name, before_run, _ret, *_args):
            if before_run:
                started[name] = time.perf_counter()
            else:
                entry = totals.setdefault(name, [0.0, 0])
                entry[0] += time.perf_counter() - started.pop(name)
                entry[1] += 1
            return 0

        vm.set_instrument(instrument)
        for _ in range(runs):
            vm["main"](arg)
        rows = [
            KernelTime(name, total * 1e3 / runs, calls // runs)
            for name, (total, calls) in totals.items()
        ]
        return sorted(rows, key=lambda r: -r.ms_per_inference)

    def export(self, outdir: str | Path) -> Path:
        """Write model.so, params.npz and manifest.json to ``outdir`` atomically (a temporary
        directory beside it, renamed into place), replacing an earlier artifact there."""
        outdir = Path(outdir)
        outdir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
        try:
            export_library(self.executable, tmp / ARTIFACT_LIBRARY, self.spec)
            np.savez(tmp / ARTIFACT_PARAMS, **self.imported.params)
            (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(self.manifest(), indent=2) + "\n")
            if outdir.exists():
                backup = outdir.with_name(f".{outdir.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                outdir.rename(backup)
                tmp.rename(outdir)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                tmp.rename(outdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return outdir

    def _plan_summary(self) -> dict | None:
        if self.plan is None:
            return None
        return {
            "model_id": self.plan.model_id,
            "method": self.plan.method,
            "weights_hash": self.plan.weights_hash,
            "mean_density": self.plan.mean_density,
            "layers": _kernel_counts(self.sparsity_decisions),
        }

    def manifest(self) -> dict:
        import timm
        import torch

        return {
            "format": "vitsparse-artifact/1",
            "model": self.imported.model_id,
            "input_shape": list(self.input_shape),
            "input_dtype": "float32",
            "target": self.spec.to_json(),
            "library": ARTIFACT_LIBRARY,
            "params": ARTIFACT_PARAMS,
            "weights": "embedded in the library as constants; params.npz holds the source "
            "weights (Relax parameter names) for verification",
            "tuned_kernels": self.tuned_kernels,
            "plan": self._plan_summary(),
            "graph": self.imported.graph.to_json(),
            "versions": {
                "vitsparse": _version(),
                "tvm": tvm.__version__,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "python": platform.python_version(),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _kernel_counts(decisions: list) -> dict[str, int]:
    kernels = [d["kernel"] for d in decisions]
    return {"bsr": kernels.count("bsr"), "dense": kernels.count("dense")}


def _version() -> str:
    from vitsparse import __version__

    return __version__


def _first_output(out):
    while not hasattr(out, "numpy"):
        out = out[0]
    return out


def open_database(db_dir: str | Path | None, spec: TargetSpec):
    """The target's MetaSchedule database under ``db_dir`` (None when there is none)."""
    if db_dir is None:
        return None
    from vitsparse.schedules.database import open_target_database

    return open_target_database(db_dir, spec, create=False)


def _break_even(spec: TargetSpec):
    """Break-even density per layer shape: measured on this machine when the target runs here;
    otherwise unmeasured, and every masked layer gets the BSR kernel."""
    if spec.runs_locally and spec.schedule_family == "cpu":
        from vitsparse.schedules.break_even import measured_break_even

        return lambda m, k, n, block: measured_break_even(spec.target, m, k, n, block)
    return lambda m, k, n, block: 1.0


def prepare(imported: ImportedModel, spec: TargetSpec, plan=None, *, database=None, dump_dir=None):
    """The weight-bound module and pipeline config that compile (or tune) ``imported`` for
    ``spec``, pruned by ``plan`` when given; plus the list BlockSparsify fills with its per-layer
    decisions while the pipeline runs."""
    plan = load_plan(plan)
    mod = imported.mod
    sparsify, decisions = None, []
    if plan is not None:
        if imported.torch_model is not None:
            validate_plan(plan, imported.torch_model)
        if plan.structure is not None and not plan.structure.empty:
            if imported.torch_model is None:
                raise PlanError(
                    f"{imported.model_id}: structural pruning (heads, MLP, embedding, tokens) "
                    "compiles PyTorch imports only; give the timm name or nn.Module, not ONNX"
                )
            passes = pipeline.structural_passes(plan.structure, imported.graph, plan.layers)
            mod = passes(mod)
        mod = AnnotatePruning(plan, imported.graph)(mod)
        sparsify = BlockSparsify(_break_even(spec), decisions)
    config = pipeline.PipelineConfig(
        target=spec.target,
        schedule_family=spec.schedule_family,
        database=database,
        block_sparsify=sparsify,
        dump_dir=Path(dump_dir) if dump_dir is not None else None,
    )
    return pipeline.bind_params(mod, imported.params), config, decisions


def compile_imported(
    imported: ImportedModel,
    *,
    target: str | dict | TargetSpec = "x86",
    cuda_arch: str | None = None,
    db: str | Path | None = None,
    plan: PruningPlan | str | Path | None = None,
    dump_dir: str | Path | None = None,
) -> CompiledModel:
    """Compile an already-imported model (see compile_model)."""
    spec = resolve_target(target, cuda_arch=cuda_arch)
    database = open_database(db, spec)
    plan = load_plan(plan)
    mod, config, decisions = prepare(imported, spec, plan, database=database, dump_dir=dump_dir)
    optimized = pipeline.optimize(mod, config)
    tuned = pipeline.count_tuned(optimized)
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(optimized, target=spec.target)
    return CompiledModel(executable, spec, imported, tuned, plan, decisions)


def compile_model(
    source,
    *,
    target: str | dict | TargetSpec = "x86",
    batch: int = 1,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    cuda_arch: str | None = None,
    db: str | Path | None = None,
    plan: PruningPlan | str | Path | None = None,
    dump_dir: str | Path | None = None,
) -> CompiledModel:
    """Import ``source`` (timm name, nn.Module or .onnx path) and compile it for ``target``.

    ``db`` is a tuning-database root (``vitsparse tune`` writes it); the target's records are
    used where they exist, the hand-written schedules everywhere else. ``plan`` (a PruningPlan or
    its JSON file) compiles the pruned model: block-masked layers become BSR kernels where their
    density is below the measured break-even, masked dense kernels elsewhere.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    # Bad targets, databases and plan files fail before the (slow) import.
    spec = resolve_target(target, cuda_arch=cuda_arch)
    open_database(db, spec)
    plan = load_plan(plan)
    imported = import_model(source, batch=batch, checkpoint=checkpoint, pretrained=pretrained)
    return compile_imported(imported, target=spec, db=db, plan=plan, dump_dir=dump_dir)


def load_artifact(outdir: str | Path) -> tuple[dict, object]:
    """(manifest, runtime module) of an exported artifact directory."""
    outdir = Path(outdir)
    manifest_path = outdir / ARTIFACT_MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{outdir}: no {ARTIFACT_MANIFEST}; not a vitsparse artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from exc
    lib_path = outdir / manifest.get("library", ARTIFACT_LIBRARY)
    if not lib_path.is_file():
        raise ArtifactError(f"{outdir}: library {lib_path.name} is missing")
    return manifest, tvm.runtime.load_module(str(lib_path))
