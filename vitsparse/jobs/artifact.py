"""A compiled ViT (`CompiledModel`: run, time, per-kernel profile, export) and the artifact
directory it exports to (`load_artifact`):

- ``model.so``: the compiled model, its weights inside it as constants (the only copy);
- ``manifest.json``: input shape and dtype, target, precision (and the int8 calibration), plan
  summary, versions;
- ``run.py``: a loader that needs nothing but TVM's runtime and numpy (`artifact_run`; see
  docs/deploy.md).

Files get the modes the user's umask gives (not the 0700 of a temporary directory)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitsparse._tvm import relax, tvm
from vitsparse._versions import collect_module_versions
from vitsparse._weights import weights_seed_of
from vitsparse.devices import LatencyStats, Timing, configure_threads, first_output, measure
from vitsparse.errors import ArtifactError, TargetError
from vitsparse.frontend import ImportedModel
from vitsparse.jobs.artifact_run import PoolGovernor
from vitsparse.plan import PruningPlan
from vitsparse.plan.quantize import Quantization
from vitsparse.targets import TargetSpec, export_library

ARTIFACT_FORMAT = "vitsparse-artifact/1"
ARTIFACT_LIBRARY = "model.so"
ARTIFACT_MANIFEST = "manifest.json"
ARTIFACT_RUNNER = "run.py"
_RUNNER_SOURCE = Path(__file__).with_name("artifact_run.py")  # also imported: PoolGovernor


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
    """A compiled ViT: the VM executable plus what it was made from. It runs on every core
    this process may use unless the user chose a thread count (`vitsparse.devices.threads`)."""

    def __init__(
        self,
        executable,
        spec: TargetSpec,
        imported: ImportedModel,
        tuned: int,
        plan: PruningPlan | None = None,
        sparsity: list | None = None,
        quantization: Quantization | None = None,
        *,
        precision: str | None = None,
        reduced_layers: tuple[str, ...] = (),
    ):
        self.executable = executable
        self.spec = spec
        self.imported = imported
        self.tuned_kernels = tuned
        self.plan = plan
        self.quantization = quantization  # int8 activation scales, None in fp32 and bf16
        if precision is None:
            precision = "fp32" if quantization is None else "int8"
        self.precision = precision  # the reduced layers' arithmetic (`vitsparse.plan.quantize`)
        if not reduced_layers and quantization is not None:
            reduced_layers = tuple(quantization.scales)
        self.reduced_layers = tuple(reduced_layers)  # PyTorch names of the layers in precision
        self.sparsity_decisions = sparsity or []  # per masked layer: density, break-even, kernel
        self._vm = None
        self._governor = None  # made with the VM (`_get_vm`)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.imported.input_shape

    def _device(self):
        if not self.spec.runs_locally:
            raise TargetError(
                f"target {self.spec.name!r} ({self.spec.key}) cannot run on this machine; "
                "export it with `vitsparse compile` and run it on the device"
            )
        return self.spec.device

    def _get_vm(self):
        if self._vm is None:
            threads = configure_threads() if self.spec.device_type == "cpu" else 1
            resize = tvm.get_global_func("runtime.config_threadpool")
            self._governor = PoolGovernor(threads, lambda n: resize(1, n))
            self._vm = relax.VirtualMachine(self.executable, self._device())
        return self._vm

    def _input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != tuple(self.input_shape):
            raise ValueError(f"input shape {x.shape} != compiled shape {self.input_shape}")
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch; returns the logits as a numpy array."""
        vm = self._get_vm()
        arg = tvm.runtime.tensor(self._input(x), self._device())
        out = self._governor.run(lambda: vm["main"](arg))  # one thread while cores are busy
        return first_output(out).numpy()

    def time(
        self, x: np.ndarray, *, repeat: int = 10, number: int = 5, warmup: int = 3
    ) -> LatencyStats:
        """Latency via the VM's time_evaluator: ``repeat`` samples of ``number`` runs each."""
        self._device()
        timing = Timing(repeat=repeat, number=number, warmup=warmup)
        return measure(self.executable, self.spec, [self._input(x)], timing=timing).latency

    def profile(self, x: np.ndarray, *, runs: int = 10) -> list[KernelTime]:
        """Per-kernel time of ``runs`` inferences (VM instrumentation; the timer adds a little
        overhead per call), most expensive first."""
        dev = self._device()
        arg = tvm.runtime.tensor(self._input(x), dev)
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
        """Write model.so, manifest.json and run.py to ``outdir`` atomically (a temporary
        directory beside it, renamed into place), replacing an earlier artifact there."""
        outdir = Path(outdir)
        outdir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
            export_library(self.executable, tmp / ARTIFACT_LIBRARY, self.spec)
            (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(self.manifest(), indent=2) + "\n")
            shutil.copyfile(_RUNNER_SOURCE, tmp / ARTIFACT_RUNNER)
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
        kernels = [d["kernel"] for d in self.sparsity_decisions]
        return {
            "model_id": self.plan.model_id,
            "method": self.plan.method,
            "weights_hash": self.plan.weights_hash,
            "mean_density": self.plan.mean_density,
            "layers": {"bsr": kernels.count("bsr"), "dense": kernels.count("dense")},
        }

    def manifest(self) -> dict:
        return {
            "format": ARTIFACT_FORMAT,
            "model": self.imported.model_id,
            "input_shape": list(self.input_shape),
            "input_dtype": "float32",
            "target": self.spec.to_json(),
            "library": ARTIFACT_LIBRARY,
            "weights": "embedded in the library as constants (the only copy)",
            # timm's random initialisation of this seed (--weights-seed), else None
            "weights_seed": weights_seed_of(self.imported.torch_model),
            "runner": ARTIFACT_RUNNER,
            "tuned_kernels": self.tuned_kernels,
            "precision": self.precision,
            "quantization": None if self.quantization is None else self.quantization.to_json(),
            "reduced_layers": list(self.reduced_layers),
            "plan": self._plan_summary(),
            "graph": self.imported.graph.to_json(),
            "versions": collect_module_versions(("tvm", "torch", "timm")),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def sparsity_summary(compiled: CompiledModel) -> str:
    """How a pruned model's masked layers were compiled, e.g. ``"48 layers BSR, 0 dense
    (break-even measured)"``."""
    kernels = [d["kernel"] for d in compiled.sparsity_decisions]
    spec = compiled.spec
    # jobs._break_even: measured only where the target runs here (CPU); else every layer BSR
    measured = spec.runs_locally and spec.schedule_family == "cpu"
    how = "break-even measured" if measured else "break-even not measured: all masked layers BSR"
    return f"{kernels.count('bsr')} layers BSR, {kernels.count('dense')} dense ({how})"


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
    if manifest.get("target", {}).get("device_type", "cpu") == "cpu":
        configure_threads()
    return manifest, tvm.runtime.load_module(str(lib_path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
