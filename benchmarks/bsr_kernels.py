"""BSR kernel vs the dense kernel of the same shape, on this x86 machine.

For deit_small's linear-layer shapes (M = 197 tokens, batch 1) and each block size, times the
tuned dense kernel (schedules/dense.py: MetaSchedule's best record for the shape, tuned here with
``--dense-trials`` trials into ``--db`` or a temporary database; the hand-written default is timed
too) and the BSR kernel (schedules/bsr.py, hand-written default knobs) at a range of kept-block
fractions (random masks, seeded), side by side in one process, and writes
``docs/results/bsr_x86.json``, ``docs/results/bsr_x86.md`` and the plot
``docs/results/bsr_x86.png`` (speedup vs density, one curve per block size and shape).

    python benchmarks/bsr_kernels.py
    python benchmarks/bsr_kernels.py --blocks 32x32 --densities 0.5 0.3 0.1 --dense-trials 0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import (
    add_output_args,
    alternate,
    host_line,
    now,
    say,
    start,
    write_suite,
)

from vitsparse.devices import Timing, measure, set_num_threads
from vitsparse.jobs.tune import tune_kernels
from vitsparse.passes.pipeline import compile_module
from vitsparse.plan import parse_block_size
from vitsparse.schedules import dense, tuning
from vitsparse.schedules.cases import KernelCase, bsr_case, check_kernel, dense_case
from vitsparse.schedules.database import open_target_database
from vitsparse.targets import host_info, resolve_target

SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384))  # (K, N) of qkv, proj, fc1, fc2
DENSITIES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
STEM = "bsr_x86"


def _timer(mod, case: KernelCase, spec, timing: Timing, what: str):
    """A function timing ``mod`` (a scheduled kernel) on ``case``'s arguments: median ms; the
    kernel's output is checked once first."""
    lib = compile_module(mod, spec.target)
    check_kernel(case, measure(lib, spec, case.args, vm=False, timing=timing).output, what)
    return lambda: measure(lib, spec, case.args, vm=False, timing=timing).latency.median_ms


def _tuned_dense(m, k, n, spec, db: Path, trials: int):
    """The dense kernel's best schedule in ``db`` after tuning it (``trials`` in all, the hand
    schedule's record included; records already there count), or None without trials."""
    if trials <= 0:
        return None
    shape = dense.DenseShape(m, k, n, "none", dense.choose_row_tile(m))
    workload = dense.dense_primfunc(shape).with_attr("global_symbol", "main")
    kernel = tuning.Kernel(f"dense_{k}x{n}", workload, 1)
    database = open_target_database(db, spec, create=True)
    tune_kernels([kernel], spec, database, trials, say=lambda msg: None)
    return database.query_schedule(kernel.workload(), spec.target, workload_name="main")


def _break_even(points: list[tuple[float, float]]) -> float | None:
    """Highest density at which BSR is still at least as fast as dense (linear interpolation
    between measured densities); None when it never is."""
    pts = sorted(points, reverse=True)
    for (d_hi, s_hi), (d_lo, s_lo) in zip(pts, pts[1:], strict=False):
        if s_hi < 1.0 <= s_lo:
            return d_lo + (d_hi - d_lo) * (s_lo - 1.0) / (s_lo - s_hi)
    if pts and pts[0][1] >= 1.0:
        return pts[0][0]
    return None


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted({r["block"] for r in results})
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        for shape in sorted({r["shape"] for r in results if r["block"] == block}):
            pts = sorted(
                (r["density"], r["speedup"])
                for r in results
                if r["block"] == block and r["shape"] == shape
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shape)
        ax.plot([0.1, 1.0], [10.0, 1.0], ":", color="grey", label="FLOP ideal")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set(
            title=f"block {block}",
            xlabel="kept-block density",
            ylabel="speedup vs dense",
            yscale="log",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args, threads, command = start(_parser(), "bsr_kernels.py", argv)
    set_num_threads(threads)
    spec = resolve_target("x86")
    timing = Timing(repeat=args.repeat, number=args.number, warmup=0)
    blocks = [parse_block_size(b) for b in args.blocks]
    results, dense_rows = [], []
    scratch = tempfile.TemporaryDirectory(prefix="vitsparse-bench-db-")
    db = Path(args.db) if args.db else Path(scratch.name)
    for k, n in SHAPES:
        say(f"{k}x{n}: dense kernel ({args.dense_trials} tuning trials)")
        case = dense_case(args.m, k, n, spec.target, seed=args.seed)
        hand = _timer(case.mod, case, spec, timing, f"dense {k}x{n}")
        tuned_sch = _tuned_dense(args.m, k, n, spec, db, args.dense_trials)
        tuned = None if tuned_sch is None else _timer(tuned_sch.mod, case, spec, timing, "tuned")
        reference = tuned or hand
        for block in blocks:
            for density in args.densities:
                sparse = bsr_case(args.m, k, n, block, density, spec.target, seed=args.seed)
                what = f"{k}x{n} block {block[0]}x{block[1]} density {sparse.density:.2f}"
                timer = _timer(sparse.mod, sparse, spec, timing, what)
                # Alternating pairs, medians of each side: one noisy sample cannot make a point.
                pairs = alternate({"bsr": timer, "dense": reference}, args.pairs)
                ms, dense_ms = float(np.median(pairs["bsr"])), float(np.median(pairs["dense"]))
                results.append(
                    {
                        "shape": f"{k}x{n}",
                        "block": f"{block[0]}x{block[1]}",
                        "density": sparse.density,
                        "bsr_ms": ms,
                        "dense_ms": dense_ms,
                        "speedup": dense_ms / ms,
                    }
                )
                say(f"{what}: {ms:.3f} ms vs dense {dense_ms:.3f} ms")
        pairs = alternate({"reference": reference, "hand": hand}, args.pairs)
        dense_rows.append(
            {
                "shape": f"{k}x{n}",
                "reference_ms": float(np.median(pairs["reference"])),
                "hand_ms": float(np.median(pairs["hand"])),
                "tuned": tuned is not None,
            }
        )
    break_even = {
        f"{s}/{b}": _break_even(
            [(r["density"], r["speedup"]) for r in results if r["shape"] == s and r["block"] == b]
        )
        for s in sorted({r["shape"] for r in results})
        for b in sorted({r["block"] for r in results})
    }
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    _plot(results, outdir / f"{STEM}.png")
    scratch.cleanup()
    suite = {
        "command": command,
        "date": now(),
        "threads": threads,
        "dense_trials": args.dense_trials,
        "pairs": args.pairs,
        "m": args.m,
        "host": host_info(),
        "dense": dense_rows,
        "results": results,
        "break_even_density": break_even,
    }
    write_suite(outdir, STEM, suite, _markdown(suite))
    return 0


def _markdown(suite) -> str:
    host = suite["host"]
    lines = [
        "# BSR kernel vs dense kernel on x86 (float32)",
        "",
        host_line(host, f"{suite['threads']} threads; date {suite['date']}"),
        f"- M = {suite['m']} rows (deit_small tokens, batch 1); random block masks; dense = "
        + (
            f"the packed dense kernel of the same shape tuned by MetaSchedule "
            f"({suite['dense_trials']} trials, the hand schedule's record among them)"
            if suite["dense_trials"] > 0
            else "the hand-scheduled packed dense kernel of the same shape, untuned"
        )
        + f", timed alternately with each BSR kernel ({suite['pairs']} pairs per point; each "
        "time is the median of its side's samples); BSR = the hand-written default knobs",
        "- reproduce with:",
        "",
        "```",
        suite["command"],
        "```",
        "",
        "![speedup vs density](bsr_x86.png)",
        "",
        "## Dense reference per shape (tuned vs hand-written, side by side)",
        "",
        "| shape K x N | reference ms | hand ms | tuned |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {d['shape']} | {d['reference_ms']:.3f} | {d['hand_ms']:.3f} "
            f"| {'yes' if d['tuned'] else 'no'} |"
            for d in suite["dense"]
        ),
        "",
        "## BSR vs dense",
        "",
        "| shape K x N | block | density | BSR ms | dense ms | speedup |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in suite["results"]:
        lines.append(
            f"| {r['shape']} | {r['block']} | {r['density']:.2f} | {r['bsr_ms']:.3f} "
            f"| {r['dense_ms']:.3f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "## Break-even density (BSR as fast as dense)",
        "",
        "| shape / block | density |",
        "| --- | ---: |",
    ]
    for key, value in suite["break_even_density"].items():
        lines.append(f"| {key} | {'never' if value is None else f'{value:.2f}'} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", nargs="+", default=["16x16", "32x32", "64x64"])
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    p.add_argument("--m", type=int, default=197)
    p.add_argument("--number", type=int, default=20)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=3, help="alternating BSR/dense timings per point")
    p.add_argument(
        "--dense-trials",
        type=int,
        default=16,
        help="MetaSchedule trials for each dense kernel (0: the untuned hand schedule)",
    )
    p.add_argument("--db", metavar="DIR", help="tuning database to reuse (default: temporary)")
    add_output_args(p)
    return p


if __name__ == "__main__":
    sys.exit(main())
