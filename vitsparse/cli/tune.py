"""``vitsparse tune``: the model's kernels tuned into a per-target database (resumable)."""

from __future__ import annotations

import argparse

from vitsparse.cli._common import (
    db_arg,
    model_args,
    model_source,
    positive_int,
    precision_args,
    rpc_args,
    rpc_device,
    say,
    target_args,
)


def add_parser(commands) -> None:
    p = commands.add_parser("tune", help="tune the model's kernels into a database")
    model_args(p)
    target_args(p)
    db_arg(p, required=True)
    precision_args(p)
    p.add_argument("--trials", type=positive_int, metavar="N", help="total trial budget")
    p.add_argument(
        "--plan", metavar="PLAN.json", help="tune the model pruned by this plan (BSR kernels too)"
    )
    rpc_args(p, "build here, measure every candidate on a device of KEY")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.tune import tune

    report = tune(
        model_source(args.model),
        target=args.target,
        db=args.db,
        trials=args.trials,
        batch=args.batch,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights_seed=args.weights_seed,
        cuda_arch=args.cuda_arch,
        plan=args.plan,
        rpc=rpc_device(args),
        precision=args.precision,
        calib=args.calib,
        calib_size=args.calib_size,
        progress=say,
    )
    print(report.summary())
