"""The result of a runtime comparison (BenchRow, BenchReport) and its rendering as JSON, a
markdown table and fixed-width text for the terminal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vitsparse._tables import markdown_table, text_table

TORCH_EAGER = "torch-eager"
ONNXRUNTIME = "onnxruntime"
TVM_DENSE = "tvm-dense"
TORCH_PRUNED = "torch-pruned"
TVM_PRUNED = "tvm-pruned"
PRUNED_RUNTIMES = (TORCH_PRUNED, TVM_PRUNED)  # errors measured against torch-pruned's output
# Peers of the TVM build on this machine's CPU, on the same ONNX file as onnxruntime (only when
# asked for): OpenVINO in float32, OpenVINO at its default precision (named in the row), and
# ONNX Runtime's static int8 quantization.
OPENVINO = "openvino"
OPENVINO_DEFAULT = "openvino-default"
ONNXRUNTIME_INT8 = "onnxruntime-int8"
PEER_RUNTIMES = (OPENVINO, OPENVINO_DEFAULT, ONNXRUNTIME_INT8)
# Every runtime a bench can run (the order of `bench_runtimes.RUNNERS`).
RUNTIMES = (TORCH_EAGER, ONNXRUNTIME, TVM_DENSE, TORCH_PRUNED, TVM_PRUNED, *PEER_RUNTIMES)
# Speedups of the pruned TVM model, beyond every dense TVM row vs every dense baseline.
_PRUNED_SPEEDUPS = ((TVM_PRUNED, TVM_DENSE), (TVM_PRUNED, TORCH_EAGER))
STATUS_OK = "ok"
_ALIGN = "llrrrrrrrrl"  # runtime, device, 8 numbers, status


@dataclass(frozen=True)
class BenchRow:
    """One runtime's result. ``latency_ms`` (median/min/max) is None when it did not run."""

    runtime: str
    device: str
    status: str
    latency_ms: Mapping[str, float] | None = None
    repeats: int = 0
    max_abs_err_vs_torch: float | None = None
    detail: str = ""
    energy_j: float | None = None  # per inference, measured by a power meter; None: no meter
    watts: float | None = None

    @property
    def ran(self) -> bool:
        return self.latency_ms is not None

    @property
    def median_ms(self) -> float | None:
        return None if self.latency_ms is None else self.latency_ms["median"]

    @classmethod
    def not_run(cls, runtime: str, device: str, reason: str, detail: str = "") -> BenchRow:
        return cls(runtime=runtime, device=device, status=f"not run: {reason}", detail=detail)

    def to_json(self) -> dict:
        return {
            "runtime": self.runtime,
            "latency_ms": None if self.latency_ms is None else dict(self.latency_ms),
            "repeats": self.repeats,
            "max_abs_err_vs_torch": self.max_abs_err_vs_torch,
            "energy_j": self.energy_j,
            "watts": self.watts,
            "status": self.status,
            "device": self.device,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchRow:
        return cls(
            runtime=data["runtime"],
            device=data.get("device", "cpu"),
            status=data["status"],
            latency_ms=None if data["latency_ms"] is None else dict(data["latency_ms"]),
            repeats=data["repeats"],
            max_abs_err_vs_torch=data["max_abs_err_vs_torch"],
            detail=data.get("detail", ""),
            energy_j=data.get("energy_j"),
            watts=data.get("watts"),
        )


@dataclass(frozen=True)
class BenchReport:
    """The result of :func:`bench`: what was measured, where, and one row per runtime.

    ``reference`` names the runtime whose output the errors are measured against: torch-eager,
    or onnxruntime for an ONNX model (the row field keeps the name ``max_abs_err_vs_torch``).
    The pruned rows (torch-pruned, tvm-pruned) are measured against torch-pruned's output, the
    same pruned weights.
    """

    model: str
    target: Mapping[str, Any]
    batch: int
    threads: int
    input_shape: tuple[int, ...]
    reference: str
    repeat: int
    number: int
    versions: Mapping[str, str]
    date: str
    host: Mapping[str, Any]
    rows: tuple[BenchRow, ...]
    weights: str = "random"
    meters: Mapping[str, str] = field(default_factory=dict)  # device -> meter, or why none
    precision: str = "fp32"  # of the TVM rows

    def row(self, runtime: str) -> BenchRow:
        """The row of ``runtime`` (KeyError if it was not included)."""
        for r in self.rows:
            if r.runtime == runtime:
                return r
        raise KeyError(f"no {runtime!r} row; rows are {[r.runtime for r in self.rows]}")

    @property
    def speedup(self) -> dict[str, float]:
        """``"<tvm row> vs <baseline>"`` -> baseline median / TVM median (above 1: TVM is
        faster), for every pair of rows that both ran: each dense TVM row vs each dense non-TVM
        baseline, then tvm-pruned vs tvm-dense and vs torch-eager. Rows measured on different
        devices (over RPC) are not compared."""
        ran = {r.runtime: r.median_ms for r in self.rows if r.ran and r.median_ms}
        device = {r.runtime: r.device for r in self.rows}
        dense = [name for name in ran if name not in PRUNED_RUNTIMES]
        pairs = [
            (t, b) for t in dense if t.startswith("tvm-") for b in dense if not b.startswith("tvm-")
        ]
        pairs += [(t, b) for t, b in _PRUNED_SPEEDUPS if t in ran and b in ran]
        return {f"{t} vs {b}": ran[b] / ran[t] for t, b in pairs if device[t] == device[b]}

    def to_json(self) -> dict:
        return {
            "format": "vitsparse-bench/1",
            "model": self.model,
            "weights": self.weights,
            "target": dict(self.target),
            "batch": self.batch,
            "threads": self.threads,
            "input_shape": list(self.input_shape),
            "reference": self.reference,
            "repeat": self.repeat,
            "number": self.number,
            "versions": dict(self.versions),
            "date": self.date,
            "host": dict(self.host),
            "rows": [r.to_json() for r in self.rows],
            "meters": dict(self.meters),
            "precision": self.precision,
            "speedup": self.speedup,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchReport:
        """Inverse of :meth:`to_json` (``speedup`` is recomputed from the rows)."""
        return cls(
            model=data["model"],
            target=dict(data["target"]),
            batch=data["batch"],
            threads=data["threads"],
            input_shape=tuple(data["input_shape"]),
            reference=data["reference"],
            repeat=data["repeat"],
            number=data["number"],
            versions=dict(data["versions"]),
            date=data["date"],
            host=dict(data["host"]),
            rows=tuple(BenchRow.from_json(r) for r in data["rows"]),
            weights=data.get("weights", "random"),
            meters=dict(data.get("meters", {})),
            precision=data.get("precision", "fp32"),
        )

    def title(self) -> str:
        shape = "x".join(str(d) for d in self.input_shape)
        return (
            f"{self.model} ({self.weights} weights), batch {self.batch}, input {shape}, "
            f"{self.threads} threads, target {self.target.get('name')} "
            f"({self.target.get('key')}), tvm rows in {self.precision}"
        )

    def table(self) -> str:
        """Fixed-width text for the terminal: a title, the rows, the speedups."""
        headers, cells = self._cells()
        lines = [self.title(), "", text_table(headers, cells, _ALIGN), ""]
        lines += self._notes()
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A markdown section: a heading, the table, then the speedups and the setup."""
        headers, cells = self._cells()
        host = self.host
        lines = [
            f"### {self.model}, batch {self.batch}",
            "",
            markdown_table(headers, cells, _ALIGN),
            "",
            *(f"- {note}" for note in self._notes()),
            f"- host: {host.get('cpu_model')} ({host.get('llvm_cpu')}, {host.get('simd')}), "
            f"{host.get('logical_cpus')} logical CPUs; {self.threads} threads per runtime",
            f"- target: `{self.target.get('key')}`; date {self.date}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in self.versions.items())}",
        ]
        return "\n".join(lines) + "\n"

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        ref = self.row(self.reference) if self.reference in self._names() else None
        ref_ms = ref.median_ms if ref is not None else None
        headers = [
            "runtime",
            "device",
            "median ms",
            "min ms",
            "max ms",
            "runs",
            f"max|err| vs {self.reference}",
            f"speedup vs {self.reference}",
            "energy mJ",
            "watts",
            "status",
        ]
        cells = []
        for r in self.rows:
            lat = r.latency_ms
            same = ref is not None and r.device == ref.device
            speed = (
                f"{ref_ms / r.median_ms:.2f}x" if same and r.ran and ref_ms and r.median_ms else "-"
            )
            err = "-" if r.max_abs_err_vs_torch is None else f"{r.max_abs_err_vs_torch:.1e}"
            cells.append(
                [
                    r.runtime,
                    r.device,
                    f"{lat['median']:.2f}" if lat else "-",
                    f"{lat['min']:.2f}" if lat else "-",
                    f"{lat['max']:.2f}" if lat else "-",
                    f"{r.repeats}x{self.number}" if r.ran else "-",
                    err,
                    speed,
                    "-" if r.energy_j is None else f"{r.energy_j * 1e3:.1f}",
                    "-" if r.watts is None else f"{r.watts:.1f}",
                    r.status,
                ]
            )
        return headers, cells

    def _notes(self) -> list[str]:
        notes = [
            f"{pair}: {ratio:.2f}x ({pair.split(' vs ')[1]} median / "
            f"{pair.split(' vs ')[0]} median)"
            for pair, ratio in self.speedup.items()
        ]
        if self.precision != "fp32":
            notes.append(
                f"the tvm rows compute in {self.precision}: their errors are measured against "
                f"the PyTorch model of the same {self.precision} computation, the "
                "other rows' against the fp32 reference"
            )
        if self.reference != TORCH_EAGER:
            notes.append(
                f"errors are measured against {self.reference}'s output (ONNX input: no "
                "PyTorch model to compare with)"
            )
        pruned = [name for name in self._names() if name in PRUNED_RUNTIMES]
        if pruned:
            notes.append(
                f"{', '.join(pruned)}: errors are measured against {TORCH_PRUNED}'s output (the "
                f"same pruned weights), not {self.reference}'s"
            )
        devices = sorted({r.device for r in self.rows if r.ran})
        if len(devices) > 1:
            notes.append(
                f"rows ran on {', '.join(devices)}: speedups compare rows of one device only"
            )
        emulated = [d for d in devices if d.endswith("(emulated)")]
        if emulated:
            notes.append(
                f"{', '.join(emulated)}: latency under emulation, not an ARM hardware number"
            )
        notes += [f"energy on {d}: {m}" for d, m in self.meters.items()]
        notes += [f"{r.runtime}: {r.detail}" for r in self.rows if r.detail]
        return notes

    def _names(self) -> list[str]:
        return [r.runtime for r in self.rows]
