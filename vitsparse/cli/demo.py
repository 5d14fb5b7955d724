"""``vitsparse demo``: the built-in default job, deit_tiny compiled for this CPU and compared
with PyTorch and ONNX Runtime."""

from __future__ import annotations

import argparse

from vitsparse.cli._common import say, timing_args
from vitsparse.errors import ModelError

DEMO_MODEL = "deit_tiny_patch16_224"


def add_parser(commands) -> None:
    p = commands.add_parser(
        "demo", help=f"compare PyTorch, ONNX Runtime and TVM on {DEMO_MODEL} for this CPU"
    )
    p.add_argument("--model", default=DEMO_MODEL, help=f"timm model name (default {DEMO_MODEL})")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="use timm's pretrained weights if they can be fetched (default: random weights)",
    )
    timing_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.frontend import load_torch_model
    from vitsparse.jobs.bench import bench

    pretrained = False
    if args.pretrained:
        try:
            load_torch_model(args.model, pretrained=True)
            pretrained = True
        except ModelError as err:
            say(f"[demo] {err}; using random weights")
    report = bench(
        args.model,
        target="x86",
        pretrained=pretrained,
        threads=args.threads,
        repeat=args.repeat,
        number=args.number,
        progress=say,
    )
    print(report.table())
