"""``vitsparse profile``: a target's cost table, measured there (resumable)."""

from __future__ import annotations

import argparse

from vitsparse.cli._common import rpc_args, rpc_device, say, target_args
from vitsparse.jobs.profile_grids import GRIDS


def add_parser(commands) -> None:
    p = commands.add_parser(
        "profile", help="measure a target's cost table (kernels and blocks over grids)"
    )
    target_args(p)
    p.add_argument("-o", "--output", metavar="COST.json", required=True, help="the cost table")
    p.add_argument(
        "--grid",
        default="default",
        choices=tuple(GRIDS),
        help="default: DeiT-Tiny/Small shapes (a few hundred points); small: a quick try",
    )
    p.add_argument(
        "--energy-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="where the device has a power meter, energy per run over a window of S seconds "
        "per point (default 1; 0 skips)",
    )
    rpc_args(p, "build here, measure every point on a device of KEY")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.profile import profile

    table = profile(
        args.target,
        args.output,
        grid=args.grid,
        rpc=rpc_device(args),
        cuda_arch=args.cuda_arch,
        energy_seconds=args.energy_seconds,
        progress=say,
    )
    print(f"cost table of {table.target['key']} on {table.device} -> {args.output}")
