"""``vitsparse profile``: measure a target's cost table.

On the target (this machine, or a device behind an RPC tracker) it times

* the dense and BSR linear kernels over a grid of shapes (tokens M, inputs K, outputs N), block
  sizes and densities: the kernels and hand-written schedules the compiler uses when a layer
  has no tuning record;
* one transformer block over a grid of (embedding E, heads, head dim, MLP width, tokens), built
  as a PyTorch block and compiled through the same pipeline as a model;

with energy per run where this machine has a power meter (`vitsparse.devices.meters`). Every
point is written to the table as soon as it is measured (atomically), so an interrupted profile
resumes where it stopped. A point that costs more than a larger shape (SLACK times more) was
disturbed (another process on the cores: TVM's thread pool slows by tens of times): it is
measured again, its lowest measurement kept, until the table is consistent or ROUNDS have
passed; this runs on a finished table too, so a cached profile is repaired. Then a few held-out
points off the grid are measured and compared with the table's interpolation
(`vitsparse.targets.cost_table.CostTable`): the table says how far its predictions are from
fresh measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vitsparse.devices import Measurement, RpcDevice, Timing, check_measurable, measure
from vitsparse.devices.meters import NoMeter, meter_for
from vitsparse.devices.rpc import emulation
from vitsparse.errors import TargetError
from vitsparse.frontend import export_torch
from vitsparse.jobs._inputs import resolve_inputs
from vitsparse.jobs.profile_grids import GRIDS, Grid
from vitsparse.passes import pipeline
from vitsparse.schedules.cases import bsr_case, check_kernel, dense_case
from vitsparse.targets import TargetSpec
from vitsparse.targets.cost_table import (
    BLOCK_AXES,
    FORMAT,
    KERNEL_AXES,
    CostTable,
    block_key,
    kernel_key,
)

__all__ = ["GRIDS", "Grid", "ProfileBlock", "compile_block", "profile"]

# Every point: a first run, then 5 samples of at least 20 ms each.
TIMING = Timing(repeat=5, number=1, warmup=0, min_repeat_ms=20)
# A point slower than SLACK times a shape at least as large on every axis is measured again,
# in up to ROUNDS passes.
SLACK = 1.5
ROUNDS = 3


def profile(
    target="x86",
    out: str | Path = "cost.json",
    *,
    grid: str | Grid = "default",
    rpc=None,
    cuda_arch: str | None = None,
    energy_seconds: float = 1.0,
    progress: Callable[[str], None] | None = print,
) -> CostTable:
    """Measure the cost table of ``target`` into ``out`` (resuming the points it already has)
    and return it, with the held-out error filled in.

    ``rpc`` (a `vitsparse.devices.RpcDevice`) measures on a device behind a tracker; the
    kernels are built here. ``energy_seconds``: window per point for energy where this machine's
    device has a meter (0 skips). ``grid``: a name in `GRIDS` or a `Grid` (its ``name`` is
    recorded in the table)."""
    say = progress or (lambda _msg: None)
    if isinstance(grid, Grid):
        g, grid = grid, grid.name
    elif grid not in GRIDS:
        raise TargetError(f"unknown profile grid {grid!r}; known: {', '.join(GRIDS)}")
    else:
        g = GRIDS[grid]
    spec = resolve_inputs(target=target, cuda_arch=cuda_arch).spec
    check_measurable(spec, rpc, "profiling")
    out = Path(out)
    device = f"rpc:{rpc.key}" if rpc is not None else spec.device_type
    table = _resume(out, spec, grid, device)
    bench = _Bench(spec, rpc, energy_seconds)
    table.meter = bench.meter_note
    table.emulated = bench.emulated
    held_kernels, held_blocks = g.held_out_points()
    todo = [
        ("kernels", p, kernel_key(p), _measure_kernel) for p in g.kernel_points() + held_kernels
    ]
    todo += [("blocks", p, block_key(p), _measure_block) for p in g.block_points() + held_blocks]
    wanted = {kind: {t[2] for t in todo if t[0] == kind} for kind in ("kernels", "blocks")}
    for kind in ("kernels", "blocks"):  # rows of an older version of the grid
        rows = getattr(table, kind)
        stale = [r for r in rows if r["key"] not in wanted[kind]]
        if stale:
            say(f"[profile] dropping {len(stale)} {kind} rows that are not in this grid")
            rows[:] = [r for r in rows if r["key"] in wanted[kind]]
    done = {kind: {row["key"] for row in getattr(table, kind)} for kind in ("kernels", "blocks")}
    left = [t for t in todo if t[2] not in done[t[0]]]
    say(
        f"[profile] {spec.key} on {device}{' (emulated)' if bench.emulated else ''}: "
        f"{len(todo)} points ({len(todo) - len(left)} already in {out}), grid {grid!r}"
    )
    start = time.time()
    for i, (kind, point, key, measure_point) in enumerate(left, 1):
        began = time.time()
        try:
            ms, energy = measure_point(point, spec, bench)
        except TargetError as err:  # the device went away: what was measured stays
            n = len(table.kernels) + len(table.blocks)
            raise TargetError(
                f"{err}. The {n} points measured are kept in {out}: re-run the same command "
                "to resume"
            ) from None
        row = dict(point, key=key, ms=ms, energy_j=energy)
        getattr(table, kind).append(row)
        table.seconds += time.time() - began
        table.save(out)
        eta = (time.time() - start) / i * (len(left) - i)
        say(f"[profile] {i}/{len(left)} {key}: {ms:.3f} ms (about {eta:.0f} s left)")
    _make_consistent(table, out, spec, bench, say)
    table.held_out = {
        "kernels": [kernel_key(p) for p in held_kernels],
        "blocks": [block_key(p) for p in held_blocks],
    }
    table.complete = True
    table.save(out)
    for kind, err in table.held_out_error().items():
        if not err["points"]:
            say(f"[profile] held-out {kind}: none (the grid's axes leave no point off its nodes)")
            continue
        say(
            f"[profile] held-out {kind}: median error {err['median_pct']:.1f}%, max "
            f"{err['max_pct']:.1f}% over {err['points']} points"
        )
    return table


def inconsistent(table: CostTable) -> list[tuple[str, dict, dict]]:
    """(kind, row, larger row) for every row that costs more than SLACK times a row of a shape
    at least as large on every axis (the same op and block for kernels): a disturbed point."""
    out = []
    for kind, axes in (("kernels", KERNEL_AXES), ("blocks", BLOCK_AXES)):
        rows = getattr(table, kind)
        for row in rows:
            larger = [
                r
                for r in rows
                if r is not row
                and (kind == "blocks" or (r["op"], r["block"]) == (row["op"], row["block"]))
                and all(float(r[a] or 0) >= float(row[a] or 0) for a in axes)
            ]
            if larger:
                cheapest = min(larger, key=lambda r: r["ms"])
                if row["ms"] > SLACK * cheapest["ms"]:
                    out.append((kind, row, cheapest))
    return out


def _make_consistent(table: CostTable, out: Path, spec, bench: _Bench, say) -> None:
    """Measure the `inconsistent` points again (their lowest measurement kept) until none is
    left or ROUNDS have passed; warn about what stays inconsistent."""
    measure_point = {"kernels": _measure_kernel, "blocks": _measure_block}
    for round_ in range(1, ROUNDS + 1):
        suspects = inconsistent(table)
        if not suspects:
            return
        say(
            f"[profile] pass {round_}: {len(suspects)} points cost more than {SLACK:g}x a "
            "larger shape (disturbed by another process?): measuring them again"
        )
        for kind, row, larger in suspects:
            point = {a: row[a] for a in row if a not in ("key", "ms", "energy_j", "remeasured")}
            ms, energy = measure_point[kind](point, spec, bench)
            say(
                f"[profile] {row['key']}: {row['ms']:.3f} -> {ms:.3f} ms "
                f"({larger['key']}: {larger['ms']:.3f})"
            )
            if ms < row["ms"]:
                row["ms"], row["energy_j"] = ms, energy
            row["remeasured"] = row.get("remeasured", 0) + 1
            table.save(out)
    left = inconsistent(table)
    if left:
        say(
            f"[profile] warning: {len(left)} points still cost more than {SLACK:g}x a larger "
            f"shape after {ROUNDS} passes (e.g. {left[0][1]['key']}: {left[0][1]['ms']:.3f} ms "
            f"vs {left[0][2]['key']}: {left[0][2]['ms']:.3f} ms); profile on a quiet machine"
        )


def _resume(out: Path, spec, grid: str, device: str) -> CostTable:
    if not out.exists():
        return CostTable(target=spec.to_json(), device=device, grid=grid, format=FORMAT)
    table = CostTable.load(out)
    theirs = (table.target.get("key"), table.device, table.grid)
    if theirs != (spec.key, device, grid):
        raise TargetError(
            f"{out} holds a profile of {theirs[0]} on {theirs[1]} (grid {theirs[2]!r}), not "
            f"{spec.key} on {device} (grid {grid!r}); remove it or write to another file"
        )
    return table


class _Bench:
    """Where points are timed: this machine, or a device behind an RPC tracker."""

    def __init__(self, spec: TargetSpec, rpc: RpcDevice | None, energy_seconds: float):
        self.spec, self.rpc, self.energy_seconds = spec, rpc, energy_seconds
        self.emulated = None
        if rpc is not None:
            rpc.check()
            self.meter = NoMeter("no meter is read over RPC")
            self.emulated = emulation(rpc.connect())
        elif energy_seconds <= 0:
            self.meter = NoMeter("skipped (--energy-seconds 0)")
        else:
            self.meter = meter_for(spec.device_type)
        self.meter_note = (
            self.meter.name if self.meter.available else f"unavailable: {self.meter.reason}"
        )

    def time(self, executable, args: list[np.ndarray], vm: bool) -> Measurement:
        """The measurement of ``main(*args)``."""
        return measure(
            executable,
            self.spec,
            args,
            rpc=self.rpc,
            timing=TIMING,
            vm=vm,
            meter=self.meter,
            energy_seconds=self.energy_seconds,
        )


def _measure_kernel(point: dict, spec: TargetSpec, bench: _Bench) -> tuple[float, float | None]:
    m, k, n = point["m"], point["k"], point["n"]
    if point["op"] == "dense":
        case = dense_case(m, k, n, spec.target)
    else:
        case = bsr_case(m, k, n, tuple(point["block"]), point["density"], spec.target)
    lib = pipeline.compile_module(case.mod, spec.target)
    measured = bench.time(lib, case.args, vm=False)
    check_kernel(case, measured.output, kernel_key(point))
    return measured.latency.median_ms, measured.energy_j


class ProfileBlock(torch.nn.Module):
    """One pre-norm transformer block (timm's layout) with free head count, head dim and MLP
    width: LN, qkv, scaled dot-product attention, proj, residual; LN, fc1, GELU, fc2, residual."""

    def __init__(self, embed: int, heads: int, head_dim: int, mlp: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.head_dim = heads, head_dim
        self.norm1 = torch.nn.LayerNorm(embed)
        self.qkv = torch.nn.Linear(embed, 3 * heads * head_dim)
        self.proj = torch.nn.Linear(heads * head_dim, embed)
        self.norm2 = torch.nn.LayerNorm(embed)
        self.fc1 = torch.nn.Linear(embed, mlp)
        self.fc2 = torch.nn.Linear(mlp, embed)

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


def compile_block(point: dict, spec: TargetSpec):
    """(Relax executable, example input, the PyTorch block) of `ProfileBlock` at ``point`` for
    ``spec``, compiled through the model pipeline."""
    block = ProfileBlock(point["embed"], point["heads"], point["head_dim"], point["mlp"]).eval()
    x = torch.randn(1, point["tokens"], point["embed"], generator=torch.Generator().manual_seed(0))
    mod, params, _ = export_torch(block, x, model_id="ProfileBlock")
    config = pipeline.PipelineConfig(target=spec.target, schedule_family=spec.schedule_family)
    return pipeline.build(mod, config, params), x.numpy(), block


def _measure_block(point: dict, spec, bench: _Bench) -> tuple[float, float | None]:
    executable, x, _ = compile_block(point, spec)
    measured = bench.time(executable, [x], vm=True)
    return measured.latency.median_ms, measured.energy_j
