"""A real RPC tracker and device server on 127.0.0.1: bench and tune measure through them, the
outputs match PyTorch, and an unreachable tracker, an unknown key or a half-given --rpc are clear
errors."""

import time

import numpy as np
import pytest
import torch

from vitsparse.cli import main
from vitsparse.compiler import compile_model
from vitsparse.errors import TargetError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.report import bench
from vitsparse.targets.rpc import (
    RpcDevice,
    parse_address,
    remote_run,
    start_server,
    start_tracker,
)

KEY = "x86-local"


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
    result = remote_run(compiled, x, farm, repeat=3, number=2, warmup=1)
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


def test_tune_over_rpc_keeps_its_records(farm, tmp_path, capsys):
    db = tmp_path / "db"
    code = main(
        ["tune", "vitsparse/digits_vit", "--db", str(db), "--trials", "2"]
        + ["--rpc", farm.tracker, "--key", KEY]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"measuring on a '{KEY}' device via the tracker {farm.tracker}" in captured.err
    records = list(db.glob("*/database_tuning_record.json"))
    assert records and records[0].read_text().count("\n") >= 5  # one line per measured record


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

    from vitsparse.targets.profile import GRIDS, profile

    monkeypatch.setitem(GRIDS, "small", TINY)
    out = tmp_path / "cost.json"
    table = profile("x86", out, grid="small", rpc=farm, progress=None)
    assert table.complete and table.device == f"rpc:{KEY}" and table.emulated is None
    assert table.meter == "unavailable: no meter is read over RPC"
    assert all(r["ms"] > 0 and r["energy_j"] is None for r in table.kernels + table.blocks)
    assert table.held_out_error()["kernels"]["points"] == 2


def test_profile_survives_a_device_that_goes_away(farm, tmp_path, monkeypatch):
    from test_profile import TINY

    from vitsparse.targets.profile import GRIDS, profile

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
