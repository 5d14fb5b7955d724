"""A real RPC tracker and device server on 127.0.0.1: bench and tune measure through them, the
outputs match PyTorch, an unreachable tracker, an unknown key or a half-given --rpc are clear
errors, and a device that goes away mid-tune stops the job, keeping its records."""

import collections
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from vitsparse.cli import main
from vitsparse.devices import DeviceWatch, Timing, measure
from vitsparse.devices.rpc import (
    RpcDevice,
    parse_address,
    start_server,
    start_tracker,
)
from vitsparse.errors import TargetError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.bench import bench
from vitsparse.jobs.compile import compile_model
from vitsparse.schedules.database import open_target_database
from vitsparse.targets import resolve_target

KEY = "x86-local"
DOOMED = "x86-doomed"  # a device that is switched off in the middle of a job


def _registered(device: RpcDevice) -> RpcDevice:
    for _ in range(50):  # a server registers itself with the tracker within a few seconds
        try:
            device.check()
            break
        except TargetError:
            time.sleep(0.2)
    return device


@pytest.fixture(scope="module")
def farm():
    tracker = start_tracker("127.0.0.1", 9390)
    address = f"127.0.0.1:{tracker.port}"
    server = start_server(address, KEY, port=9490)
    device = _registered(RpcDevice(address, KEY))
    yield device
    server.terminate()
    tracker.terminate()


def test_remote_run_matches_pytorch(farm):
    model = tiny_vit(depth=1)
    compiled = compile_model(model, target="x86")
    x = np.random.default_rng(0).standard_normal(compiled.input_shape, dtype=np.float32)
    timing = Timing(repeat=3, number=2, warmup=1)
    result = measure(compiled.executable, compiled.spec, [x], rpc=farm, timing=timing)
    with torch.no_grad():
        expect = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.output, expect, rtol=0, atol=1e-4)
    assert len(result.seconds) == 3 and all(s > 0 for s in result.seconds)
    assert result.device == f"rpc:{KEY}" and result.emulated is None  # a real device


def test_bench_measures_tvm_rows_on_the_device(farm):
    report = bench(
        tiny_vit(depth=1),
        include=("torch-eager", "tvm-dense"),
        repeat=2,
        number=1,
        rpc=farm,
        progress=None,
    )
    row = report.row("tvm-dense")
    assert row.status == "ok" and row.device == f"rpc:{KEY}"
    assert row.max_abs_err_vs_torch < 1e-4
    assert f"via the tracker {farm.tracker}" in row.detail
    assert report.row("torch-eager").device == "cpu"


@pytest.fixture(scope="module")
def tuned_over_rpc(farm, tmp_path_factory):
    """`tune --rpc` of the digits model on the farm: exit status, database root and stderr."""
    db = tmp_path_factory.mktemp("tune-rpc") / "db"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            ["tune", "vitsparse/digits_vit", "--db", str(db), "--trials", "2"]
            + ["--rpc", farm.tracker, "--key", KEY]
        )
    return code, db, err.getvalue()


def test_tune_over_rpc_keeps_its_records(farm, tuned_over_rpc):
    code, db, err = tuned_over_rpc
    assert code == 0, err
    assert f"measuring on a '{KEY}' device via the tracker {farm.tracker}" in err
    records = list(db.glob("*/database_tuning_record.json"))
    assert records and records[0].read_text().count("\n") >= 5  # one line per measured record


def _switchable_server(tracker: str, key: str) -> subprocess.Popen:
    """`vitsparse rpc server` in a process group of its own, as a board that can be unplugged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitsparse.cli", "rpc", "server", "--tracker", tracker]
        + ["--key", key, "--port", "9495"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        with contextlib.suppress(TargetError):
            if RpcDevice(tracker, key).check()["queue_info"][key]["free"]:  # registered, idle
                return proc
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the server for {key} did not register")


def _kill_when_measuring(server: subprocess.Popen, tracker: str, killed: dict) -> None:
    """Kill the server's process group once a job holds a session on it (mid-measurement)."""
    from tvm import rpc

    session = rpc.connect_tracker(*parse_address(tracker))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        if session.summary()["queue_info"].get(DOOMED, {}).get("free") == 0:
            os.killpg(server.pid, signal.SIGKILL)
            killed["at"] = time.monotonic()
            return
        time.sleep(0.05)


@pytest.mark.slow  # about 3 min here (two local builds); the watch itself is tested below
def test_tune_stops_when_the_device_goes_away_and_resumes(farm, tuned_over_rpc, tmp_path, capsys):
    # The farm's database, less the hand-schedule records of two kernels: the job measures them
    # first, and the device is killed while it does. The search trials the database holds
    # already spend the budget of 1 trial, so that a resumed job has nothing else to do.
    db = tmp_path / "db"
    shutil.copytree(tuned_over_rpc[1], db)
    (records,) = db.glob("*/database_tuning_record.json")
    lines = records.read_text().splitlines()
    counts = collections.Counter(json.loads(line)[0] for line in lines)
    assert max(counts.values()) >= 2, "the farm's job recorded no search trial"
    dropped = sorted(w for w, n in counts.items() if n == 1)[-2:]
    kept = [line for line in lines if json.loads(line)[0] not in dropped]
    records.write_text("\n".join(kept) + "\n")
    command = ["tune", "vitsparse/digits_vit", "--db", str(db), "--trials", "1"]
    command += ["--rpc", farm.tracker, "--key", DOOMED]

    server = _switchable_server(farm.tracker, DOOMED)
    killed: dict = {}
    killer = threading.Thread(target=_kill_when_measuring, args=(server, farm.tracker, killed))
    killer.start()
    try:
        code = main(command)
        stopped = time.monotonic()
    finally:
        killer.join(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    err = capsys.readouterr().err
    assert "at" in killed, "the job never measured on the device:\n" + err
    assert code == 2 and stopped - killed["at"] < 30, err
    assert f"device '{DOOMED}' went away during the job" in err
    assert f"at the tracker {farm.tracker}" in err and "re-run the same command" in err
    after = records.read_text().splitlines()  # intact: every record of before, one per line
    assert set(kept) <= set(after) and all(json.loads(line) for line in after)
    spec = resolve_target("x86")
    assert len(open_target_database(db, spec, create=False)) == len(after)

    server = _switchable_server(farm.tracker, DOOMED)  # the device is back: the job resumes
    try:
        code = main(command)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    err = capsys.readouterr().err
    assert code == 0, err
    missing = len(dropped) - len({json.loads(line)[0] for line in after} & set(dropped))
    assert (f"measuring the hand-written schedules of {missing} kernels" in err) == (missing > 0)
    assert "already spent" in err
    final = records.read_text().splitlines()
    assert set(after) <= set(final)
    assert {json.loads(line)[0] for line in final} >= set(dropped)


def test_device_watch_stops_a_job_blocked_in_a_wait():
    # The job above may end on its own before the watch sees the device gone (its last check
    # then finds it); a longer job is stopped in the main thread, from wherever it waits.
    class Device:
        key, checks = DOOMED, 0

        def check(self):
            self.checks += 1
            if self.checks > 2:
                raise TargetError(f"no device is registered under key {DOOMED!r}")

    before = signal.getsignal(signal.SIGINT)
    start = time.monotonic()
    with pytest.raises(TargetError, match=f"device '{DOOMED}' went away during the job: no dev"):
        with DeviceWatch(Device(), lambda: "Nothing was measured", period=0.2):
            threading.Event().wait(60)
    assert time.monotonic() - start < 10
    assert signal.getsignal(signal.SIGINT) is before


def test_errors(farm, tmp_path, capsys):
    with pytest.raises(TargetError, match="cannot reach the RPC tracker at 127.0.0.1:1"):
        RpcDevice("127.0.0.1:1", KEY).check()
    with pytest.raises(TargetError, match=r"no device is registered under key 'pi4'.*x86-local"):
        RpcDevice(farm.tracker, "pi4").check()
    with pytest.raises(TargetError, match="is not HOST:PORT"):
        parse_address("localhost")
    code = main(["bench", "vitsparse/digits_vit", "--rpc", farm.tracker, "-o", "x"][:4])
    assert code == 2 and "--rpc HOST:PORT and --key KEY go together" in capsys.readouterr().err
    out = tmp_path / "b.json"
    code = main(
        ["bench", "vitsparse/digits_vit", "--rpc", "127.0.0.1:1", "--key", KEY]
        + ["--json", str(out)]
    )
    assert code == 2 and "cannot reach the RPC tracker" in capsys.readouterr().err
    assert not out.exists()


def test_profile_over_rpc(farm, tmp_path, monkeypatch):
    from test_profile import TINY

    from vitsparse.jobs.profile import GRIDS, profile

    monkeypatch.setitem(GRIDS, "small", TINY)
    out = tmp_path / "cost.json"
    table = profile("x86", out, grid="small", rpc=farm, progress=None)
    assert table.complete and table.device == f"rpc:{KEY}" and table.emulated is None
    assert table.meter == "unavailable: no meter is read over RPC"
    assert all(r["ms"] > 0 and r["energy_j"] is None for r in table.kernels + table.blocks)
    assert table.held_out_error()["kernels"]["points"] == 2


def test_profile_survives_a_device_that_goes_away(farm, tmp_path, monkeypatch):
    from test_profile import TINY

    from vitsparse.jobs.profile import GRIDS, profile

    monkeypatch.setitem(GRIDS, "small", TINY)
    server = start_server(farm.tracker, "x86-leaving", port=9690)
    device = _registered(RpcDevice(farm.tracker, "x86-leaving"))
    out = tmp_path / "cost.json"
    measured = []

    def kill_after_two(msg):
        if " ms (about" in msg:
            measured.append(msg)
            if len(measured) == 2:
                server.terminate()
                time.sleep(5)  # the tracker drops the server's registration

    with pytest.raises(TargetError, match=r"x86-leaving.*2 points measured are kept in .*resume"):
        profile("x86", out, grid="small", rpc=device, progress=kill_after_two)
    server = start_server(farm.tracker, "x86-leaving", port=9690)
    try:
        _registered(device)
        lines = []
        table = profile("x86", out, grid="small", rpc=device, progress=lines.append)
        assert "(2 already in" in lines[0] and table.complete
    finally:
        server.terminate()
