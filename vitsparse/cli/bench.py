"""``vitsparse bench``: the model under PyTorch, ONNX Runtime and TVM, side by side."""

from __future__ import annotations

import argparse

from vitsparse._io import write_text_atomic
from vitsparse.cli._common import (
    db_arg,
    model_args,
    model_source,
    output_file,
    precision_args,
    rpc_args,
    rpc_device,
    say,
    target_args,
    timing_args,
    write_json,
)
from vitsparse.errors import PlanError
from vitsparse.jobs.bench_report import PRUNED_RUNTIMES, RUNTIMES


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="time the model under PyTorch, ONNX Runtime and TVM")
    model_args(p)
    target_args(p)
    timing_args(p)
    precision_args(p)
    db_arg(p)
    p.add_argument(
        "--runtimes",
        type=runtime_list,
        metavar="R1,R2",
        help="runtimes to compare, comma-separated (default: torch-eager,onnxruntime,tvm-dense, "
        "then torch-pruned,tvm-pruned with --plan)",
    )
    p.add_argument(
        "--plan", metavar="PLAN.json", help="pruning plan (`vitsparse prune`) for the pruned rows"
    )
    p.add_argument(
        "--energy-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="where a row's device has a power meter (RAPL, NVML), measure energy per inference "
        "and watts over a window of at least S seconds (default 3; 0 skips)",
    )
    rpc_args(p, "measure the TVM rows on a device of KEY (PyTorch/ONNX Runtime stay here)")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the report as JSON")
    p.add_argument("--markdown", type=output_file, metavar="FILE", help="write it as markdown")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.bench import bench

    pruned = [name for name in args.runtimes or () if name in PRUNED_RUNTIMES]
    if pruned and args.plan is None:
        raise PlanError(f"runtime(s) {', '.join(pruned)} need a pruning plan: add --plan PLAN.json")
    report = bench(
        model_source(args.model),
        target=args.target,
        batch=args.batch,
        threads=args.threads,
        repeat=args.repeat,
        number=args.number,
        db=args.db,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights_seed=args.weights_seed,
        cuda_arch=args.cuda_arch,
        include=args.runtimes,
        plan=args.plan,
        energy_seconds=args.energy_seconds,
        rpc=rpc_device(args),
        precision=args.precision,
        calib=args.calib,
        calib_size=args.calib_size,
        progress=say,
    )
    print(report.table())
    if args.json is not None:
        write_json(args.json, report.to_json())
        say(f"[bench] wrote {args.json}")
    if args.markdown is not None:
        write_text_atomic(args.markdown, report.to_markdown())
        say(f"[bench] wrote {args.markdown}")


def runtime_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown runtime(s) {unknown}; known: {', '.join(RUNTIMES)}"
        )
    return names
