"""``vitsparse finetune``: recover a pruned model's accuracy by distillation, keeping its plan;
writes a checkpoint and the plan re-issued for it (compile/bench/eval them like any other)."""

from __future__ import annotations

import argparse

from vitsparse.cli._common import model_source, positive_int, say, weights_args


def add_parser(commands) -> None:
    p = commands.add_parser(
        "finetune", help="fine-tune a pruned model by distillation from the dense one"
    )
    p.add_argument("model", metavar="MODEL", help="timm model name or vitsparse/digits_vit")
    weights_args(p)
    p.add_argument("--plan", required=True, metavar="PLAN.json", help="the pruning plan it keeps")
    data_args(p, "--data")
    p.add_argument(
        "-o", "--output", required=True, metavar="OUTDIR", help="model.pt, plan.json, report"
    )
    p.add_argument(
        "--teacher",
        metavar="FILE",
        help="a checkpoint of MODEL to distil from (default: the dense model itself)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps")
    budget.add_argument("--epochs", type=positive_int, metavar="E", help="epochs (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="B")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05, metavar="WD")
    p.add_argument(
        "--warmup", type=float, default=0.1, metavar="F", help="warm-up fraction of the steps"
    )
    p.add_argument("--temperature", type=float, default=4.0, metavar="T", help="distillation T")
    p.add_argument("--kd-weight", type=float, default=1.0, metavar="W", help="KL to the teacher")
    p.add_argument(
        "--ce-weight", type=float, default=1.0, metavar="W", help="cross-entropy (labelled data)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument(
        "--save-every", type=positive_int, default=50, metavar="N", help="steps between saves"
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in OUTDIR")
    p.set_defaults(run=run)


def data_args(p: argparse.ArgumentParser, flag: str, required: bool = True) -> None:
    p.add_argument(
        flag,
        dest="data",
        required=required,
        metavar="SRC",
        help="training images: ImageFolder directory, 'digits-train', or 'synthetic' "
        "(data-free distillation); a held-out part of it picks the best epoch",
    )


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.finetune import finetune

    report = finetune(
        model_source(args.model),
        plan=args.plan,
        data=args.data,
        out=args.output,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights_seed=args.weights_seed,
        teacher=args.teacher,
        resume=args.resume,
        progress=say,
        steps=args.steps,
        epochs=args.epochs if args.epochs or args.steps else 10,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        temperature=args.temperature,
        kd_weight=args.kd_weight,
        ce_weight=args.ce_weight,
        seed=args.seed,
        save_every=args.save_every,
    )
    print(report.summary())
