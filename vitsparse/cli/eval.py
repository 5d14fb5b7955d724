"""``vitsparse eval``: top-1 of a model (and of it pruned) and the pruned model's fidelity."""

from __future__ import annotations

import argparse

from vitsparse.cli._common import model_source, output_file, positive_int, weights_args, write_json


def add_parser(commands) -> None:
    p = commands.add_parser(
        "eval", help="top-1 accuracy of a model (and of it pruned), and the pruned fidelity"
    )
    p.add_argument("model", metavar="MODEL", help="timm model name or vitsparse/digits_vit")
    p.add_argument(
        "--data",
        required=True,
        metavar="SRC",
        help="ImageFolder directory, 'digits' (held-out split), 'digits-train' or 'synthetic'",
    )
    p.add_argument("--plan", metavar="PLAN.json", help="also evaluate the model pruned by it")
    p.add_argument("--limit", type=positive_int, metavar="N", help="use at most N images")
    weights_args(p)
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.eval import evaluate_model

    model_id, report = evaluate_model(
        model_source(args.model),
        args.data,
        plan=args.plan,
        limit=args.limit,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights_seed=args.weights_seed,
    )
    print(f"model     {model_id}")
    print(report.summary())
    if args.json is not None:
        write_json(args.json, report.to_json())
