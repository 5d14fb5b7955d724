"""Power meters: read a host's energy counters or power rails, or say why there are none.

- `RaplMeter`: Intel/AMD RAPL through ``/sys/class/powercap`` (package and DRAM zones; each zone's
  ``energy_uj`` counter wraps at ``max_energy_range_uj``, which is handled).
- `Ina3221Meter`: Jetson INA3221 rails through sysfs (``in_power<N>_input`` in mW with
  ``rail_name_<N>``, as the Jetson driver exposes them), sampled and integrated.
- `NvmlMeter`: an NVIDIA GPU through NVML (``nvidia-ml-py``): the total-energy counter where the
  GPU has one, the power reading sampled and integrated otherwise.

A meter that cannot run here has ``available == False`` and a ``reason``; nothing is estimated.
`measure_energy` runs a workload repeatedly for a window of at least a few seconds and divides
the energy by the count: energy per inference and mean watts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")
INA3221_ROOTS = (
    Path("/sys/bus/i2c/drivers/ina3221x"),  # Jetson TX2 / Xavier / Nano (L4T <= 32)
    Path("/sys/bus/i2c/drivers/ina3221"),
)


@dataclass(frozen=True)
class EnergyReading:
    """Energy of ``count`` runs over ``seconds`` (a measured window)."""

    meter: str
    joules: float
    seconds: float
    count: int

    @property
    def energy_j(self) -> float:
        """Energy per run."""
        return self.joules / self.count

    @property
    def watts(self) -> float:
        return self.joules / self.seconds


class Meter:
    """A source of cumulative energy: ``start()``, then ``joules()`` since the start."""

    name = "meter"
    available = False
    reason = "not a meter"

    def start(self) -> None:
        raise NotImplementedError

    def joules(self) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        """Release what ``start`` took (a sampling thread, a library handle)."""


class RaplMeter(Meter):
    """RAPL package (and DRAM) energy counters under ``root``, summed over zones."""

    name = "rapl"

    def __init__(self, root: Path | str | None = None, *, dram: bool = True):
        self.root = Path(RAPL_ROOT if root is None else root)
        self.zones: list[Path] = []
        if not self.root.is_dir():
            self.reason = f"no {self.root} (no powercap/RAPL interface on this host)"
            return
        for zone in sorted(self.root.glob("*rapl:*")):
            name = _read(zone / "name")
            if name is None or not (zone / "energy_uj").exists():
                continue
            top = zone.name.count(":") == 1
            if (top and name.startswith("package")) or (dram and name == "dram"):
                self.zones.append(zone)
        unreadable = [z for z in self.zones if _read_int(z / "energy_uj") is None]
        if not self.zones:
            self.reason = f"no RAPL package zone under {self.root}"
        elif unreadable:
            self.reason = f"{unreadable[0] / 'energy_uj'} is not readable (needs root)"
        else:
            self.available, self.reason = True, ""
        self._last: dict[Path, int] = {}
        self._total_uj = 0

    def start(self) -> None:
        self._last = {z: _read_int(z / "energy_uj") for z in self.zones}
        self._total_uj = 0

    def joules(self) -> float:
        for zone in self.zones:
            now = _read_int(zone / "energy_uj")
            span = _read_int(zone / "max_energy_range_uj")
            delta = now - self._last[zone]
            if delta < 0:  # the counter wrapped (at most once between two reads)
                delta += (span if span else 2**32) + 1
            self._total_uj += delta
            self._last[zone] = now
        return self._total_uj / 1e6


class _SampledMeter(Meter):
    """Integrates a power reading (watts) sampled every ``interval`` seconds in a thread."""

    interval = 0.02

    def watts_now(self) -> float:
        raise NotImplementedError

    def start(self) -> None:
        self._joules, self._stop = 0.0, threading.Event()
        self._last = (time.perf_counter(), self.watts_now())
        self._lock = threading.Lock()

        def run():
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        now, watts = time.perf_counter(), self.watts_now()
        with self._lock:
            then, before = self._last
            self._joules += (now - then) * (watts + before) / 2  # trapezoid
            self._last = (now, watts)

    def joules(self) -> float:
        self._sample()
        with self._lock:
            return self._joules

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Ina3221Meter(_SampledMeter):
    """The sum of a Jetson's INA3221 rails (``in_power<N>_input``, mW) found under the roots."""

    name = "ina3221"

    def __init__(self, roots=None, *, rails: tuple[str, ...] | None = None):
        self.files: list[Path] = []
        self.rails: list[str] = []
        roots = [Path(r) for r in (INA3221_ROOTS if roots is None else roots)]
        for root in roots:
            for power in sorted(root.glob("**/in_power*_input")):
                channel = power.name[len("in_power") : -len("_input")]
                rail = _read(power.with_name(f"rail_name_{channel}")) or f"rail{channel}"
                if rails is None or rail in rails:
                    self.files.append(power)
                    self.rails.append(rail)
        if self.files:
            self.available, self.reason = True, ""
        else:
            where = ", ".join(str(r) for r in roots)
            self.reason = f"no INA3221 power rails (in_power<N>_input) under {where}"

    def watts_now(self) -> float:
        return sum(_read_int(f) or 0 for f in self.files) / 1e3


class NvmlMeter(_SampledMeter):
    """GPU ``index`` through NVML: its total-energy counter (mJ) where supported, else its power
    reading (mW) sampled."""

    name = "nvml"

    def __init__(self, index: int = 0):
        self.counter = False
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as err:
            self.reason = f"NVML: {err} (no NVIDIA driver or GPU {index} on this host)"
            return
        self.nvml = pynvml
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
        except pynvml.NVMLError:
            self.counter = False
        self.available, self.reason = True, ""

    def watts_now(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3

    def start(self) -> None:
        if not self.counter:
            return super().start()
        self._base = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def joules(self) -> float:
        if not self.counter:
            return super().joules()
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._base) / 1e3

    def stop(self) -> None:
        if not self.counter:
            super().stop()


class NoMeter(Meter):
    """A device kind vitsparse has no meter for."""

    name = "none"

    def __init__(self, reason: str):
        self.reason = reason


METERS = {"cpu": RaplMeter, "cuda": NvmlMeter, "jetson": Ina3221Meter}


def meter_for(device: str) -> Meter:
    """The meter for a device kind: ``"cpu"`` (RAPL), ``"cuda"`` (NVML), ``"jetson"`` (INA3221);
    an unavailable `NoMeter` for any other."""
    if device not in METERS:
        return NoMeter(f"no power meter for {device!r} devices (known: {', '.join(METERS)})")
    return METERS[device]()


def measure_energy(
    run: Callable[[], object], meter: Meter, *, min_seconds: float = 3.0
) -> EnergyReading:
    """Run ``run()`` repeatedly for at least ``min_seconds`` with ``meter`` counting; the energy
    per run and the mean watts. ``meter`` must be available."""
    if not meter.available:
        raise RuntimeError(f"{meter.name} meter unavailable: {meter.reason}")
    run()  # warm up outside the window
    count = 0
    meter.start()
    try:
        start = time.perf_counter()
        while True:
            run()
            count += 1
            seconds = time.perf_counter() - start
            if seconds >= min_seconds:
                break
        joules = meter.joules()
    finally:
        meter.stop()
    return EnergyReading(meter.name, joules, seconds, count)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None
