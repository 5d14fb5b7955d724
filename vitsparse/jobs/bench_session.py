"""What the runtimes of one bench call share (`Session`: the input, the reference, the timing,
the ONNX file) and how the ones on this machine's CPU are timed (`Contender`,
`time_alternating`: alternating rounds with a pause between runtimes), below the runtimes
themselves (`bench_runtimes`, `bench_peers`)."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from vitsparse.devices import Timing
from vitsparse.devices.measure import LatencyStats
from vitsparse.devices.meters import measure_energy, meter_for
from vitsparse.jobs.bench_report import (
    STATUS_OK,
    TORCH_EAGER,
    BenchRow,
)
from vitsparse.plan import PruningPlan

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
        self,
        runtime,
        out,
        latency,
        *,
        detail,
        pruned=False,
        device="cpu",
        repeats=None,
        run=None,
        reference=None,
    ):
        """The row of a runtime that ran: its latency, its error against the reference (or the
        ``reference`` output given: a reduced precision's own), and its energy where ``device``
        has a meter (``run`` runs it once)."""
        energy_j, watts = (None, None) if run is None else self.energy(device, run)
        return BenchRow(
            runtime=runtime,
            device=device,
            status=STATUS_OK,
            latency_ms=latency,
            repeats=self.timing.repeat if repeats is None else repeats,
            max_abs_err_vs_torch=self.error(out, pruned=pruned, reference=reference),
            detail=detail,
            energy_j=energy_j,
            watts=watts,
        )

    def error(self, out: np.ndarray, *, pruned: bool = False, reference=None) -> float:
        if reference is None:
            reference = self.pruned_reference if pruned else self.reference
        return float(np.max(np.abs(np.asarray(out, np.float32) - reference)))

    def onnx_file(self) -> tuple[Path, str]:
        """(ONNX path, how it was made): the source file, or the torch model exported once."""
        if self._onnx is None:
            if self.imported.onnx_path is not None:
                self._onnx = (Path(self.imported.onnx_path), "the source ONNX file")
            else:
                self.say(f"[bench] exporting {self.imported.model_id} to ONNX ...")
                self._onnx = export_onnx(self.imported.torch_model, self.x, self.tmpdir)
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


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ort_session(session: Session) -> tuple[Callable[[], np.ndarray], str]:
    """A CPU InferenceSession on the session's ONNX file: (run, how the file was made)."""
    path, made_from = session.onnx_file()
    return ort_runner(session, path), made_from


def ort_runner(session: Session, path: Path) -> Callable[[], np.ndarray]:
    """One inference of a CPU InferenceSession on ``path`` (``session.threads`` threads) on the
    session's input."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = session.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort_session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {ort_session.get_inputs()[0].name: session.x}
    return lambda: ort_session.run(None, feed)[0]


def export_onnx(model, x: np.ndarray, outdir: Path) -> tuple[Path, str]:
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
