"""Cost tables: interpolation on synthetic tables, and `vitsparse profile` measuring a small grid on
this machine for real, resuming after an interruption and reporting its held-out error."""

import dataclasses
import json

import pytest

from vitsparse.cli import main
from vitsparse.errors import TargetError
from vitsparse.frontend import load_torch_model
from vitsparse.jobs import profile as profile_mod
from vitsparse.jobs.profile import GRIDS, Grid, profile
from vitsparse.targets.cost_table import CostTable, block_key, kernel_key

TINY = Grid(
    tokens=(17,),
    k=(64, 128),
    n=(64,),
    blocks=((16, 16),),
    densities=(0.25, 0.75),
    embed=(64,),
    heads=(2,),
    head_dim=(16, 32),
    mlp=(128,),
    block_tokens=(17,),
    held_out=2,
)


def _synthetic(cost_kernel, cost_block, grid: Grid = GRIDS["default"]) -> CostTable:
    table = CostTable(target={"key": "x"}, device="cpu", grid="default")
    for p in grid.kernel_points():
        table.kernels.append(dict(p, key=kernel_key(p), ms=cost_kernel(p), energy_j=None))
    for p in grid.block_points():
        table.blocks.append(dict(p, key=block_key(p), ms=cost_block(p), energy_j=None))
    return table


def _kernel_cost(p):
    return 1e-6 * p["m"] * p["k"] * p["n"] * p["density"] * (2 if p["op"] == "bsr" else 1)


def _block_cost(p):
    return 1e-5 * p["embed"] * p["tokens"] * (p["heads"] * p["head_dim"] + p["mlp"])


def test_interpolation_is_exact_on_grid_points_and_for_products():
    table = _synthetic(_kernel_cost, _block_cost)
    assert table.kernel_ms("dense", 197, 384, 768) == pytest.approx(1e-6 * 197 * 384 * 768)
    # Off the grid: a cost proportional to m*k*n*density is multilinear in log space.
    got = table.kernel_ms("bsr", 120, 250, 1000, block=(32, 32), density=0.42)
    assert got == pytest.approx(2e-6 * 120 * 250 * 1000 * 0.42, rel=1e-9)
    p = dict(embed=192, heads=6, head_dim=64, mlp=1536, tokens=197)
    assert table.block_ms(**p) == pytest.approx(_block_cost(p))
    # A sum is not a product: between the nodes the prediction is close, not exact.
    q = dict(embed=256, heads=4, head_dim=48, mlp=1000, tokens=100)
    assert table.block_ms(**q) == pytest.approx(_block_cost(q), rel=0.1)


def test_queries_outside_the_grid_or_on_holes_are_errors():
    table = _synthetic(_kernel_cost, _block_cost)
    with pytest.raises(TargetError, match=r"m=400 is outside the profiled range 50\.\.197"):
        table.kernel_ms("dense", 400, 384, 768)
    with pytest.raises(TargetError, match="no bsr 8x8 measurements"):
        table.kernel_ms("bsr", 50, 192, 192, block=(8, 8), density=0.5)
    with pytest.raises(TargetError, match="needs its block size"):
        table.kernel_ms("bsr", 50, 192, 192)
    with pytest.raises(TargetError, match="heads=12 is outside"):
        table.block_ms(192, 12, 64, 768, 197)
    table.blocks.pop(3)
    with pytest.raises(TargetError, match="1 unmeasured points.*same -o"):
        table.block_ms(192, 3, 64, 768, 197)


def test_held_out_error_compares_predictions_with_measurements():
    table = _synthetic(_kernel_cost, _block_cost)
    p = dict(op="bsr", m=100, k=300, n=500, block=[16, 16], density=0.5)
    table.kernels.append(dict(p, key=kernel_key(p), ms=_kernel_cost(p) * 1.2, energy_j=None))
    table.held_out = {"kernels": [kernel_key(p)], "blocks": []}
    err = table.held_out_error()
    assert err["kernels"]["points"] == 1
    # measured 1.2x the (exact) prediction: |pred - ms| / ms = 0.2 / 1.2
    assert err["kernels"]["median_pct"] == pytest.approx(100 * 0.2 / 1.2)
    assert err["blocks"] == {"points": 0, "median_pct": None, "max_pct": None, "rows": []}


def test_corrupt_or_foreign_tables_are_named(tmp_path):
    bad = tmp_path / "cost.json"
    bad.write_text("{not json")
    with pytest.raises(TargetError, match="not valid JSON"):
        CostTable.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TargetError, match="not a cost table"):
        CostTable.load(bad)
    bad.write_text(json.dumps({"format": "vitsparse-cost-table/1", "target": {}}))
    with pytest.raises(TargetError, match="malformed cost table"):
        CostTable.load(bad)
    with pytest.raises(TargetError, match="no such cost table"):
        CostTable.load(tmp_path / "missing.json")


class _Interrupt(Exception):
    pass


def test_profile_measures_resumes_and_reports_held_out_error(tmp_path, monkeypatch):
    monkeypatch.setitem(GRIDS, "small", TINY)
    out = tmp_path / "cost.json"
    lines = []

    def stop_after_three(msg):
        lines.append(msg)
        if sum(line.startswith("[profile] ") and " ms (about" in line for line in lines) == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        profile("x86", out, grid="small", energy_seconds=0, progress=stop_after_three)
    partial = CostTable.load(out)
    assert len(partial.kernels) == 3 and not partial.complete
    assert all(r["ms"] > 0 for r in partial.kernels)

    lines.clear()
    table = profile("x86", out, grid="small", energy_seconds=0, progress=lines.append)
    assert "(3 already in" in lines[0]
    held_kernels, held_blocks = TINY.held_out_points()
    # off the nodes: 2 kernels; the blocks' axes leave one point (head_dim 24)
    assert (len(held_kernels), len(held_blocks)) == (2, 1)
    kernels, blocks = len(TINY.kernel_points()) + 2, len(TINY.block_points()) + 1
    assert (kernels, blocks) == (8, 3)
    assert sum(" ms (about" in line for line in lines) == kernels + blocks - 3
    assert table.complete and len(table.kernels) == kernels and len(table.blocks) == blocks
    assert partial.kernels == table.kernels[:3]  # the first three were not measured again
    assert table.meter == "unavailable: skipped (--energy-seconds 0)"
    saved = json.loads(out.read_text())
    err = saved["held_out_error"]
    assert err["kernels"]["points"] == 2 and err["blocks"]["points"] == 1
    for row in err["kernels"]["rows"] + err["blocks"]["rows"]:
        assert row["predicted_ms"] > 0 and row["ms"] > 0
        assert row["pct"] == pytest.approx(abs(row["predicted_ms"] - row["ms"]) / row["ms"] * 100)
    assert any(line.startswith("[profile] held-out blocks: median error") for line in lines)
    # The table predicts between its nodes.
    assert table.kernel_ms("bsr", 17, 96, 64, block=(16, 16), density=0.5) > 0

    # Another grid (or target) is not silently mixed into this file.
    monkeypatch.setitem(GRIDS, "default", dataclasses.replace(TINY, held_out=1))
    with pytest.raises(TargetError, match=r"grid 'small'.*not.*grid 'default'"):
        profile("x86", out, grid="default", energy_seconds=0, progress=None)


def test_profile_block_matches_pytorch():
    import numpy as np
    import torch

    from vitsparse._tvm import relax, tvm
    from vitsparse.devices import first_output
    from vitsparse.targets import resolve_target

    spec = resolve_target("x86")
    point = dict(embed=64, heads=2, head_dim=24, mlp=96, tokens=17)  # heads * head_dim != embed
    executable, x, block = profile_mod.compile_block(point, spec)
    vm = relax.VirtualMachine(executable, spec.device)
    got = first_output(vm["main"](tvm.runtime.tensor(x, spec.device))).numpy()
    with torch.no_grad():
        expect = block(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "cuda"], "profiling cuda-sm_80 (gpu schedules) is not supported yet"),
        (["--target", "arm"], "needs a device that runs it"),
        (["--grid", "huge"], "invalid choice: 'huge'"),
        (["--rpc", "127.0.0.1:9"], "--rpc HOST:PORT and --key KEY go together"),
        (["--rpc", "127.0.0.1:1", "--key", "k"], "cannot reach the RPC tracker at 127.0.0.1:1"),
    ],
)
def test_profile_cli_errors(tmp_path, capsys, args, message):
    out = tmp_path / "cost.json"
    if "invalid choice" in message:
        with pytest.raises(SystemExit):
            main(["profile", "-o", str(out), *args])
    else:
        assert main(["profile", "-o", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_cost_table_is_a_cost_model_for_the_criteria(tmp_path):
    from vitsparse.data.sources import load_images
    from vitsparse.errors import PlanError
    from vitsparse.frontend.testing import tiny_vit
    from vitsparse.plan import Structure
    from vitsparse.pruning.budget import Budget
    from vitsparse.pruning.cost import TableCost
    from vitsparse.pruning.criteria import make_plan

    table = _synthetic(_kernel_cost, _block_cost)
    table.complete = True
    cost = TableCost(table).for_block((32, 32))
    dense = 1e-6 * 197 * 192 * 768
    assert cost.saving("fc1", (768, 192), 197, 0.5) == pytest.approx(dense - 2 * dense * 0.5)
    assert cost.saving("fc1", (768, 192), 197, 0.6) == pytest.approx(dense - 2 * dense * 0.4)
    assert cost.saving("fc1", (768, 192), 197, 0.05) == 0.0  # density 0.95: above the grid
    deit = load_torch_model("deit_tiny_patch16_224")[0]
    block = dict(embed=192, heads=3, head_dim=64, mlp=768, tokens=197)
    assert cost.model_cost(deit, Structure()) == pytest.approx(12 * _block_cost(block))
    with pytest.raises(TargetError, match="no bsr 8x8"):
        TableCost(table).for_block((8, 8))

    # The knob: NViT and LPViT read the table (a small model: extrapolated below the grid).
    path = tmp_path / "cost.json"
    table.save(path)
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4, patch_size=4)
    calib = load_images("synthetic", image_size=32, limit=8).images
    for method, knobs in (("nvit", {"steps": 2}), ("lpvit", {"block": "32x32"})):
        plan = make_plan(
            method, model, calib, Budget("flops", 0.6), model_id="t",
            knobs={**knobs, "cost": str(path)},
        )  # fmt: skip
        assert Budget("flops", 0.6).fits(model, plan)
    with pytest.raises(PlanError, match="nvit knob cost: .*no such cost table"):
        make_plan(
            "nvit", model, calib, Budget("flops", 0.6), model_id="t",
            knobs={"cost": str(tmp_path / "none.json")},
        )  # fmt: skip
