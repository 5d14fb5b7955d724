"""``vitsparse profile``: measure a target's cost table.

On the target (this machine, or a device behind an RPC tracker) it times

* the dense and BSR linear kernels over a grid of shapes (tokens M, inputs K, outputs N), block
  sizes and densities: the kernels and hand-written schedules the compiler uses when a layer
  has no tuning record;
* one transformer block over a grid of (embedding E, heads, head dim, MLP width, tokens), built
  as a PyTorch block and compiled through the same pipeline as a model;

with energy per run where this machine has a power meter (`vitsparse.targets.meters`). Every
point is written to the table as soon as it is measured (atomically), so an interrupted profile
resumes where it stopped. Then a few held-out points off the grid are measured and compared with
the table's interpolation (`vitsparse.targets.cost_table.CostTable`): the table says how far its
predictions are from fresh measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitsparse.errors import TargetError
from vitsparse.targets.cost_table import FORMAT, CostTable, block_key, kernel_key

TIMING_REPEAT = 5
TIMING_MIN_MS = 20


@dataclass(frozen=True)
class Grid:
    """The profiled points: kernels over tokens x k x n (x block x density for BSR), blocks over
    embed x heads x head_dim x mlp x tokens; then ``held_out`` random points of each kind."""

    tokens: tuple[int, ...]
    k: tuple[int, ...]
    n: tuple[int, ...]
    blocks: tuple[tuple[int, int], ...]
    densities: tuple[float, ...]
    embed: tuple[int, ...]
    heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    mlp: tuple[int, ...]
    block_tokens: tuple[int, ...]
    held_out: int

    def kernel_points(self) -> list[dict]:
        points = []
        for m in self.tokens:
            for k in self.k:
                for n in self.n:
                    points.append(dict(op="dense", m=m, k=k, n=n, block=None, density=1.0))
                    for block in self.blocks:
                        for d in self.densities:
                            points.append(
                                dict(op="bsr", m=m, k=k, n=n, block=list(block), density=d)
                            )
        return points

    def block_points(self) -> list[dict]:
        return [
            dict(embed=e, heads=h, head_dim=d, mlp=f, tokens=t)
            for e in self.embed
            for h in self.heads
            for d in self.head_dim
            for f in self.mlp
            for t in self.block_tokens
        ]

    def held_out_points(self, seed: int = 0) -> tuple[list[dict], list[dict]]:
        """``held_out`` random points of each kind inside the grid's ranges and off its nodes
        (fewer where the axes leave no room)."""
        rng = np.random.default_rng(seed)
        step = int(np.lcm.reduce([c for b in self.blocks for c in b])) if self.blocks else 16

        def pick(axis, multiple=1):
            lo, hi = min(axis), max(axis)
            value = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            return int(min(max(round(value / multiple) * multiple, lo), hi))

        def kernel(i):
            block = self.blocks[i % len(self.blocks)] if self.blocks else None
            m, k, n = pick(self.tokens), pick(self.k, step), pick(self.n, step)
            if block is None or i % 4 == 3:
                return dict(op="dense", m=m, k=k, n=n, block=None, density=1.0)
            d = round(float(rng.uniform(min(self.densities), max(self.densities))), 3)
            return dict(op="bsr", m=m, k=k, n=n, block=list(block), density=d)

        def block(_i):
            return dict(
                embed=pick(self.embed, 8),
                heads=pick(self.heads),
                head_dim=pick(self.head_dim, 8),
                mlp=pick(self.mlp, 8),
                tokens=pick(self.block_tokens),
            )

        out = []
        for make, nodes, key in (
            (kernel, self.kernel_points(), kernel_key),
            (block, self.block_points(), block_key),
        ):
            taken, points = {key(p) for p in nodes}, []
            for _ in range(100 * self.held_out):
                if len(points) == self.held_out:
                    break
                point = make(len(points))
                if key(point) not in taken:
                    taken.add(key(point))
                    points.append(point)
            out.append(points)
        return out[0], out[1]


GRIDS: dict[str, Grid] = {
    # DeiT-Tiny/Small shapes: 50 or 197 tokens, E 192..384, MLP up to 1536.
    "default": Grid(
        tokens=(50, 197),
        k=(192, 384, 768),
        n=(192, 768, 1536),
        blocks=((16, 16), (32, 32)),
        densities=(0.1, 0.3, 0.5, 0.7, 0.9),
        embed=(192, 384),
        heads=(3, 6),
        head_dim=(32, 64),
        mlp=(768, 1536),
        block_tokens=(50, 197),
        held_out=8,
    ),
    # A few seconds a point on this machine: for trying the command and for the tests.
    "small": Grid(
        tokens=(17, 50),
        k=(64, 128),
        n=(64, 128),
        blocks=((16, 16),),
        densities=(0.25, 0.75),
        embed=(64, 96),
        heads=(2,),
        head_dim=(16, 32),
        mlp=(128,),
        block_tokens=(17, 50),
        held_out=3,
    ),
}


def profile(
    target="x86",
    out: str | Path = "cost.json",
    *,
    grid: str = "default",
    rpc=None,
    cuda_arch: str | None = None,
    energy_seconds: float = 1.0,
    progress: Callable[[str], None] | None = print,
) -> CostTable:
    """Measure the cost table of ``target`` into ``out`` (resuming the points it already has)
    and return it, with the held-out error filled in.

    ``rpc`` (a `vitsparse.targets.rpc.RpcDevice`) measures on a device behind a tracker; the
    kernels are built here. ``energy_seconds``: window per point for energy where this machine's
    device has a meter (0 skips)."""
    from vitsparse.targets import resolve_target
    from vitsparse.targets.rpc import check_measurable

    say = progress or (lambda _msg: None)
    if grid not in GRIDS:
        raise TargetError(f"unknown profile grid {grid!r}; known: {', '.join(GRIDS)}")
    spec = resolve_target(target, cuda_arch=cuda_arch)
    check_measurable(spec, rpc, "profiling")
    out = Path(out)
    device = f"rpc:{rpc.key}" if rpc is not None else spec.device_type
    table = _resume(out, spec, grid, device)
    bench = _Bench(spec, rpc, energy_seconds)
    table.meter = bench.meter_note
    table.emulated = bench.emulated
    g = GRIDS[grid]
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
    for i, (kind, point, key, measure) in enumerate(left, 1):
        began = time.time()
        try:
            ms, energy = measure(point, spec, bench)
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

    def __init__(self, spec, rpc, energy_seconds: float):
        from vitsparse.targets.meters import NoMeter, meter_for

        self.spec, self.rpc, self.energy_seconds = spec, rpc, energy_seconds
        self.emulated = None
        if rpc is not None:
            from vitsparse.targets.rpc import emulation

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

    def time(self, executable, args: list[np.ndarray], vm: bool) -> tuple[float, float | None]:
        """(median ms, energy J per run or None) of ``main(*args)``."""
        from vitsparse._tvm import relax, tvm

        if self.rpc is None:
            dev = self.spec.device
            module = relax.VirtualMachine(executable, dev) if vm else executable.mod
            return self._timed(module, [tvm.runtime.tensor(a, dev) for a in args], dev, vm)
        from vitsparse.targets.rpc import upload

        session = self.rpc.connect()
        try:
            dev = session.device(self.spec.device_type, 0)
            module = upload(session, executable, self.spec, "point.so")
            if vm:
                module = relax.VirtualMachine(module, dev)
            return self._timed(module, [tvm.runtime.tensor(a, dev) for a in args], dev, vm)
        except TargetError:
            raise
        except Exception as err:  # noqa: BLE001 - a lost device surfaces as any FFI error
            raise TargetError(
                f"device {self.rpc.key!r} via {self.rpc.tracker} failed: {err}"
            ) from None

    def _timed(self, module, args, dev, vm: bool) -> tuple[float, float | None]:
        from vitsparse.targets.meters import measure

        func = module["main"]
        func(*args)
        timer = module.time_evaluator(
            "main", dev, number=1, repeat=TIMING_REPEAT, min_repeat_ms=TIMING_MIN_MS
        )
        ms = float(np.median(list(timer(*args).results))) * 1e3
        energy = None
        if self.meter.available:
            reading = measure(lambda: func(*args), self.meter, min_seconds=self.energy_seconds)
            energy = reading.energy_j
        return ms, energy


def _measure_kernel(point: dict, spec, bench: _Bench) -> tuple[float, float | None]:
    from vitsparse._tvm import Schedule, tvm
    from vitsparse.schedules import bsr, dense

    m, k, n = point["m"], point["k"], point["n"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = np.zeros(n, dtype=np.float32)
    y = np.zeros((m, n), np.float32)
    if point["op"] == "dense":
        shape = dense.DenseShape(m, k, n, "none", dense.choose_row_tile(m))
        sch = Schedule(dense.dense_primfunc(shape).with_attr("global_symbol", "main"))
        dense.schedule_dense_cpu(sch, dense.default_knobs(shape))
        lib = tvm.compile(sch.mod, target=spec.target)
        args = [x, dense.pack_weight(w), b, y]
    else:
        block = tuple(point["block"])
        kept = rng.random((n // block[0], k // block[1])) < point["density"]
        kept.flat[0] = True  # at least one block
        packed = bsr.to_bsr(w, kept, block)
        shape = bsr.BSRShape.of(m, packed, target=spec.target)
        lib = tvm.compile(bsr.scheduled_cpu(shape, spec.target), target=spec.target)
        args = [x, packed.data, packed.indices, packed.indptr, b, y]
    return bench.time(lib, args, vm=False)


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


def compile_block(point: dict, spec):
    """(Relax executable, example input) of `ProfileBlock` at ``point`` for ``spec``, compiled
    with the model pipeline's phases and schedules."""
    from vitsparse._tvm import from_exported_program, relax, tvm
    from vitsparse.frontend.canonicalize import drop_weight_broadcasts
    from vitsparse.passes import pipeline

    block = ProfileBlock(point["embed"], point["heads"], point["head_dim"], point["mlp"]).eval()
    x = torch.randn(1, point["tokens"], point["embed"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = torch.export.export(block, (x,))
    mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    names = [p.name for p in func.params[int(func.attrs["num_input"]) :]]
    params = {n: a.numpy() for n, a in zip(names, detached["main"], strict=True)}
    mod = pipeline.bind_params(drop_weight_broadcasts(mod), params)
    config = pipeline.PipelineConfig(target=spec.target, schedule_family=spec.schedule_family)
    optimized = pipeline.optimize(mod, config)
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(optimized, target=spec.target), x.numpy(), block


def _measure_block(point: dict, spec, bench: _Bench) -> tuple[float, float | None]:
    executable, x, _ = compile_block(point, spec)
    return bench.time(executable, [x], vm=True)
