"""The one way vitsparse measures: a latency window, and an energy window where the device has a
meter, of a compiled model or kernel, on this machine or on a device behind an RPC tracker.

`measure` is used by everything that times TVM code (compiled models and their artifacts,
bench, the tuning job's hand-schedule records, profile, break-even densities); `time_call` is the
same scheme for host-side runtimes (PyTorch, ONNX Runtime). Both take `Timing`: ``repeat``
samples, each the mean of ``number`` runs, after ``warmup`` runs (TVM's time_evaluator). A device
that goes away while it is measured gives one error, a TargetError that names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vitsparse._tvm import relax, tvm
from vitsparse.devices.meters import Meter, measure_energy
from vitsparse.devices.rpc import RpcDevice, emulation, upload
from vitsparse.devices.threads import configure_threads
from vitsparse.errors import TargetError
from vitsparse.targets import TargetSpec


@dataclass(frozen=True)
class Timing:
    """``repeat`` samples, each the mean of ``number`` runs, after ``warmup`` runs; a sample runs
    at least ``min_repeat_ms`` (more runs if needed; TVM's time_evaluator only)."""

    repeat: int = 10
    number: int = 5
    warmup: int = 3
    min_repeat_ms: int = 0

    def __post_init__(self):
        if self.repeat < 1 or self.number < 1 or self.warmup < 0 or self.min_repeat_ms < 0:
            raise ValueError(
                f"timing needs repeat >= 1, number >= 1, warmup >= 0 and min_repeat_ms >= 0, "
                f"got {self.repeat}, {self.number}, {self.warmup}, {self.min_repeat_ms}"
            )


@dataclass(frozen=True)
class LatencyStats:
    """Latency of repeated runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @staticmethod
    def from_seconds(samples: Sequence[float]) -> LatencyStats:
        return LatencyStats.from_ms(np.asarray(samples, dtype=np.float64) * 1e3)

    @staticmethod
    def from_ms(samples: Sequence[float]) -> LatencyStats:
        ms = np.asarray(samples, dtype=np.float64)
        return LatencyStats(float(np.median(ms)), float(ms.min()), float(ms.max()), len(ms))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def as_row(self) -> dict[str, float]:
        """``{"median", "min", "max"}`` in ms, as a bench row holds it."""
        return {"median": self.median_ms, "min": self.min_ms, "max": self.max_ms}


@dataclass(frozen=True)
class Measurement:
    """What `measure` saw: the latency (and its raw samples in seconds), the output of the first
    run (a model's logits, or what a kernel wrote to its last argument), where it ran
    (``"cpu"``, ``"cuda"``, ``"rpc:KEY"``, ``"rpc:KEY (emulated)"``), what an emulated device
    emulates, and the energy per run and mean watts where a meter measured them."""

    latency: LatencyStats
    seconds: tuple[float, ...]
    output: np.ndarray | None
    device: str
    emulated: str | None = None
    energy_j: float | None = None
    watts: float | None = None


def measure(
    executable,
    spec: TargetSpec,
    args: Sequence[np.ndarray],
    *,
    rpc: RpcDevice | None = None,
    timing: Timing = Timing(),
    vm: bool = True,
    meter: Meter | None = None,
    energy_seconds: float = 0.0,
) -> Measurement:
    """Run ``executable`` (``tvm.compile``'s result for ``spec``) once on ``args`` and time it.

    ``vm``: a Relax VM executable whose ``main`` returns the output; otherwise a kernel library
    whose ``main`` writes into its last argument. Locally, TVM's pool runs on every core the
    process may use unless the user chose otherwise (`vitsparse.devices.threads`); with ``rpc``,
    the executable is uploaded to a free device of its key. With an available ``meter`` (local
    only) and ``energy_seconds > 0``, a window of at least that long measures the energy.
    """
    with _session(spec, rpc) as (dev, load, where, emulated):
        loaded = load(executable)
        if vm:
            loaded = relax.VirtualMachine(loaded, dev)
        elif isinstance(loaded, tvm.runtime.Executable):
            loaded = loaded.jit()
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
        out = loaded["main"](*tensors)
        output = first_output(out).numpy() if vm else tensors[-1].numpy()
        for _ in range(timing.warmup):
            loaded["main"](*tensors)
        timer = loaded.time_evaluator(
            "main",
            dev,
            number=timing.number,
            repeat=timing.repeat,
            min_repeat_ms=timing.min_repeat_ms,
        )
        seconds = tuple(float(s) for s in timer(*tensors).results)
        energy_j = watts = None
        if meter is not None and meter.available and energy_seconds > 0 and rpc is None:
            reading = measure_energy(
                lambda: loaded["main"](*tensors), meter, min_seconds=energy_seconds
            )
            energy_j, watts = reading.energy_j, reading.watts
    return Measurement(
        LatencyStats.from_seconds(seconds), seconds, output, where, emulated, energy_j, watts
    )


def time_call(fn: Callable[[], object], timing: Timing = Timing()) -> LatencyStats:
    """`measure`'s scheme for a Python callable (a host-side runtime): ``repeat`` samples of
    the mean of ``number`` calls, after ``warmup`` calls."""
    for _ in range(timing.warmup):
        fn()
    samples = []
    for _ in range(timing.repeat):
        start = time.perf_counter()
        for _ in range(timing.number):
            fn()
        samples.append((time.perf_counter() - start) / timing.number * 1e3)
    return LatencyStats.from_ms(samples)


def first_output(out):
    """The first tensor of a VM result (a tensor, or nested tuples of them)."""
    while not hasattr(out, "numpy"):
        out = out[0]
    return out


def check_measurable(spec: TargetSpec, rpc: RpcDevice | None, job: str) -> None:
    """TargetError unless ``job`` ("tuning", "profiling") can measure ``spec`` here or on
    ``rpc``'s device: CPU schedules only, and a target this machine cannot run needs a device
    behind a tracker."""
    if spec.schedule_family != "cpu":
        raise TargetError(
            f"{job} {spec.key} ({spec.schedule_family} schedules) is not supported yet; "
            "CPU targets (x86, arm) are measured here or over RPC"
        )
    if not spec.runs_locally and rpc is None:
        raise TargetError(
            f"{job} {spec.key} needs a device that runs it; this machine cannot. Measure on one "
            "through a tracker: --rpc HOST:PORT --key KEY"
        )


@contextlib.contextmanager
def _session(spec: TargetSpec, rpc: RpcDevice | None) -> Iterator[tuple]:
    """(TVM device, load(executable) -> module there, where, what it emulates) of this machine
    or of a device of ``rpc``'s key; any failure there is the device's TargetError."""
    if rpc is None:
        if not spec.runs_locally:
            raise TargetError(
                f"target {spec.name!r} ({spec.key}) cannot run on this machine; export it with "
                "`vitsparse compile` and run it on the device, or measure it over RPC"
            )
        if spec.device_type == "cpu":
            configure_threads()
        yield spec.device, lambda executable: executable, spec.device_type, None
        return
    session = rpc.connect()
    try:
        emulated = emulation(session)
        where = f"rpc:{rpc.key}" + (" (emulated)" if emulated else "")
        dev = session.device(spec.device_type, 0)
        yield dev, lambda executable: upload(session, executable, spec, "model.so"), where, emulated
    except TargetError:
        raise
    except Exception as err:  # noqa: BLE001 - a lost device surfaces as any FFI error
        raise TargetError(f"device {rpc.key!r} via {rpc.tracker} failed: {err}") from None
