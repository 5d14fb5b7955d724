"""``vitsparse search``: prune to a latency or energy budget measured on the target, re-planning
from what it measured; writes the journal, the front, the chosen plan and its artifact."""

from __future__ import annotations

import argparse

from vitsparse.cli._common import (
    model_source,
    positive_int,
    precision_args,
    rpc_args,
    rpc_device,
    say,
    target_args,
    weights_args,
)

METHODS = ("nvit", "lpvit", "cpvit", "upvit", "magnitude", "magnitude-structure", "combined")


def add_parser(commands) -> None:
    p = commands.add_parser(
        "search", help="prune to a latency/energy budget measured on the target"
    )
    p.add_argument("model", metavar="MODEL", help="timm model name or vitsparse/digits_vit")
    weights_args(p)
    target_args(p)
    rpc_args(p, "build here, measure every candidate on a device of KEY")
    p.add_argument(
        "--budget",
        required=True,
        metavar="B",
        help="latency=12.5ms (absolute), latency=0.5 (of the dense model, measured in the "
        "same run), energy=40mJ or energy=0.5 (targets with a power meter)",
    )
    p.add_argument("--batch", type=positive_int, default=1, metavar="B", help="batch size")
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="default: all CPUs this process may use"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["nvit", "lpvit", "cpvit", "upvit", "magnitude", "combined"],
        choices=METHODS,
        metavar="M",
        help=f"criteria to search ({', '.join(METHODS)}; default all but magnitude-structure)",
    )
    p.add_argument(
        "--data",
        default="synthetic",
        metavar="SRC",
        help="calibration and evaluation images: ImageFolder, 'digits' or 'synthetic' (default; "
        "fidelity only)",
    )
    p.add_argument("--calib-size", type=positive_int, default=64, metavar="N")
    precision_args(p, calib="--data's calibration images")
    p.add_argument("--eval-size", type=positive_int, default=256, metavar="N")
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune every candidate N steps by distillation before judging its quality",
    )
    p.add_argument(
        "--iterations", type=positive_int, default=4, metavar="N", help="candidates per method"
    )
    p.add_argument(
        "--cost-table",
        metavar="COST.json",
        help="a `vitsparse profile` table (default: this model's shapes profiled, cached)",
    )
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="journal, front, chosen plan")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.search import search

    report = search(
        model_source(args.model),
        budget=args.budget,
        out=args.out,
        target=args.target,
        cuda_arch=args.cuda_arch,
        rpc=rpc_device(args),
        methods=args.methods,
        data=args.data,
        calib_size=args.calib_size,
        precision=args.precision,
        eval_size=args.eval_size,
        finetune_steps=args.finetune_steps,
        iterations=args.iterations,
        batch=args.batch,
        threads=args.threads,
        cost_table=args.cost_table,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights_seed=args.weights_seed,
        progress=say,
    )
    print(report.summary())
