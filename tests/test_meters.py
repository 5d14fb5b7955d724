"""Power meters on fixture sysfs trees: RAPL (package + DRAM, a counter wrap), INA3221 rails, and
"unavailable" with a reason where a host has no meter."""

import time

import pytest

from vitsparse.devices.meters import Ina3221Meter, NvmlMeter, RaplMeter, measure_energy


def _zone(root, name, label, energy, span=2**32 - 1):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(f"{label}\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{span}\n")
    return zone


def test_rapl_sums_package_and_dram_and_handles_a_wrap(tmp_path):
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, span=1_000_000_000)
    dram = _zone(tmp_path, "intel-rapl:0:1", "dram", 5_000_000)
    _zone(tmp_path, "intel-rapl:0:0", "core", 7)  # a subzone inside the package: not added
    meter = RaplMeter(tmp_path)
    assert meter.available and meter.zones == [pkg, dram]
    meter.start()
    (pkg / "energy_uj").write_text("2000000\n")  # wrapped: 999 J -> 1000 J (range) -> 2 J
    (dram / "energy_uj").write_text("6500000\n")  # +1.5 J
    assert meter.joules() == pytest.approx(1.000001 + 2 + 1.5, rel=1e-9)
    (pkg / "energy_uj").write_text("3000000\n")  # +1 J more
    assert meter.joules() == pytest.approx(5.500001, rel=1e-9)
    assert RaplMeter(tmp_path, dram=False).zones == [pkg]


def test_rapl_unavailable_says_why(tmp_path):
    missing = RaplMeter(tmp_path / "nope")
    assert not missing.available and "no powercap/RAPL interface" in missing.reason
    empty = RaplMeter(tmp_path)
    assert not empty.available and "no RAPL package zone" in empty.reason
    with pytest.raises(RuntimeError, match="rapl meter unavailable: no RAPL package zone"):
        measure_energy(lambda: None, empty)


def test_ina3221_rails_are_sampled_and_integrated(tmp_path):
    device = tmp_path / "ina3221x" / "1-0040" / "iio:device0"
    device.mkdir(parents=True)
    for channel, (rail, mw) in enumerate([("VDD_IN", 4000), ("VDD_CPU", 1000)]):
        (device / f"rail_name_{channel}").write_text(f"{rail}\n")
        (device / f"in_power{channel}_input").write_text(f"{mw}\n")
    meter = Ina3221Meter([tmp_path / "ina3221x"])
    assert meter.available and meter.rails == ["VDD_IN", "VDD_CPU"]
    assert meter.watts_now() == pytest.approx(5.0)
    only = Ina3221Meter([tmp_path / "ina3221x"], rails=("VDD_IN",))
    reading = measure_energy(lambda: time.sleep(0.01), only, min_seconds=0.3)
    assert reading.watts == pytest.approx(4.0, rel=0.05)  # a constant 4 W rail
    assert reading.energy_j == pytest.approx(reading.joules / reading.count)
    assert reading.count >= 10
    gone = Ina3221Meter([tmp_path / "none"])
    assert not gone.available and "no INA3221 power rails" in gone.reason


def test_nvml_reports_unavailable_without_a_gpu():
    meter = NvmlMeter()
    if meter.available:
        pytest.skip("this host has an NVIDIA GPU (the GPU tests measure it)")
    assert meter.reason  # says why: no library, or no driver/GPU
