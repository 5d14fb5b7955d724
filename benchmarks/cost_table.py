"""The cost table of a target (``vitsparse profile``) and how well it predicts held-out points.

Runs the profile (the ``default`` grid: DeiT-Tiny/Small kernel shapes, block sizes, densities and
transformer blocks) into ``docs/results/cost_<target key>.json``, resuming a table already
there, and writes ``docs/results/profile_<target>.md``: the grid, the time it took, the held-out
points' measured and predicted latency with their errors, and what the table predicts for
deit_tiny/deit_small's layer shapes.

    python benchmarks/cost_table.py                      # this machine (x86)
    python benchmarks/cost_table.py --grid small         # a quick try
    python benchmarks/cost_table.py --target arm --rpc 127.0.0.1:9190 --key arm-qemu
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import RESULTS, reproduce_block, say  # noqa: E402

from vitsparse._io import write_text_atomic  # noqa: E402
from vitsparse.devices.rpc import RpcDevice  # noqa: E402
from vitsparse.jobs.profile import GRIDS, profile  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="x86")
    p.add_argument("--grid", default="default", choices=sorted(GRIDS))
    p.add_argument("--rpc", metavar="HOST:PORT")
    p.add_argument("--key", metavar="KEY")
    p.add_argument("--energy-seconds", type=float, default=1.0)
    p.add_argument("--outdir", default=str(RESULTS), metavar="DIR")
    args = p.parse_args(argv)
    rpc = RpcDevice(args.rpc, args.key) if args.rpc else None
    name = args.target if rpc is None else f"{args.target}_{args.key}"
    outdir = Path(args.outdir)
    suffix = "" if args.grid == "default" else f"_{args.grid}"
    table_path = outdir / f"cost_{name}{suffix}.json"
    table = profile(
        args.target,
        table_path,
        grid=args.grid,
        rpc=rpc,
        energy_seconds=args.energy_seconds,
        progress=say,
    )
    command = "python benchmarks/cost_table.py " + shlex.join(argv or sys.argv[1:])
    text = _markdown(table, args.grid, table_path, command.strip())
    write_text_atomic(outdir / f"profile_{name}{suffix}.md", text)
    say(f"wrote {table_path} and {outdir / f'profile_{name}{suffix}.md'}")
    return 0


def _markdown(table, grid: str, table_path: Path, command: str) -> str:
    g = GRIDS[grid]
    err = table.held_out_error()
    device = table.device + (f" ({table.emulated}: emulated latencies)" if table.emulated else "")
    shown = table_path.relative_to(REPO) if table_path.is_relative_to(REPO) else table_path
    lines = [
        f"# Cost table: {table.target['key']} on {device}",
        "",
        f"- table: `{shown}`"
        f" ({len(table.kernels)} kernel and {len(table.blocks)} block points, grid `{grid}`);"
        f" building and measuring them took {table.seconds:.0f} s",
        f"- kernels: tokens {g.tokens} x K {g.k} x N {g.n}; dense, and BSR with blocks "
        f"{', '.join(f'{r}x{c}' for r, c in g.blocks)} at densities {g.densities} (random masks)",
        f"- blocks: embed {g.embed} x heads {g.heads} x head dim {g.head_dim} x MLP {g.mlp} x "
        f"tokens {g.block_tokens}",
        f"- energy: {table.meter}",
        "- prediction: multilinear in log(latency) over log(each axis) between grid nodes",
        "",
        "## Held-out points: fresh measurements vs the table's prediction",
        "",
    ]
    for kind in ("kernels", "blocks"):
        e = err[kind]
        if not e["points"]:
            lines += [f"- {kind}: no held-out point", ""]
            continue
        lines += [
            f"**{kind}**: median error {e['median_pct']:.1f}%, max {e['max_pct']:.1f}% over "
            f"{e['points']} points",
            "",
            "| point | measured ms | predicted ms | error |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['key']} | {r['ms']:.4f} | {r['predicted_ms']:.4f} | {r['pct']:.1f}% |"
            for r in e["rows"]
        ]
        lines.append("")
    lines += _predictions(table, g)
    lines += reproduce_block(command)
    return "\n".join(lines)


def _predictions(table, g) -> list[str]:
    """The table's predictions for DeiT-Tiny's layer shapes that fall inside the grid."""
    shapes = {"qkv": (192, 576), "proj": (192, 192), "fc1": (192, 768), "fc2": (768, 192)}
    m = max(g.tokens)
    rows = []
    for name, (k, n) in shapes.items():
        try:
            dense = table.kernel_ms("dense", m, k, n)
        except Exception:  # noqa: BLE001 - outside this grid: not predicted
            continue
        for block in g.blocks:
            for d in (0.3, 0.5):
                try:
                    ms = table.kernel_ms("bsr", m, k, n, block, d)
                except Exception:  # noqa: BLE001
                    continue
                rows.append(
                    f"| {name} {m}x{k}x{n} | {block[0]}x{block[1]} | {d} | {dense:.4f} | "
                    f"{ms:.4f} | {dense / ms:.2f}x |"
                )
    if not rows:
        return []
    return [
        f"## Predicted: DeiT-Tiny's linear layers at {m} tokens (off-grid shapes interpolated)",
        "",
        "| layer (MxKxN) | block | density | dense ms | BSR ms | BSR speedup |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
