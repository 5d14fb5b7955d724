"""``vitsparse compile``: a model (pruned by a plan, tuned by a database) into an artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitsparse.cli._common import (
    check_artifact_dir,
    db_arg,
    model_args,
    model_source,
    precision_args,
    say,
    target_args,
)


def add_parser(commands) -> None:
    p = commands.add_parser("compile", help="compile a model into a deployable artifact")
    model_args(p)
    target_args(p)
    precision_args(p)
    db_arg(p)
    p.add_argument("--dump-ir", metavar="DIR", help="write the module after each phase here")
    p.add_argument("--plan", metavar="PLAN.json", help="compile the model pruned by this plan")
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="artifact directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.artifact import ARTIFACT_MANIFEST, sparsity_summary
    from vitsparse.jobs.compile import compile_model
    from vitsparse.targets import check_precision, resolve_target

    outdir = Path(args.output)
    check_artifact_dir(outdir, ARTIFACT_MANIFEST)
    # A target or precision it refuses is named before the progress line (compile_model checks
    # them again, with the rest of its inputs).
    check_precision(resolve_target(args.target, cuda_arch=args.cuda_arch), args.precision)
    say(f"[compile] compiling {args.model} for {args.target} ...")
    compiled = compile_model(
        model_source(args.model),
        target=args.target,
        batch=args.batch,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights_seed=args.weights_seed,
        cuda_arch=args.cuda_arch,
        db=args.db,
        plan=args.plan,
        dump_dir=args.dump_ir,
        precision=args.precision,
        calib=args.calib,
        calib_size=args.calib_size,
    )
    compiled.export(outdir)
    graph = compiled.imported.graph
    tuned = f"{compiled.tuned_kernels} kernels from the tuning database"
    if args.db is None:
        tuned = "none (no --db; hand-written schedules)"
    elif compiled.tuned_kernels == 0:
        tuned += f" (no records for {compiled.spec.key} under {args.db})"
    files = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in sorted(outdir.iterdir()))
    print(f"model     {graph.summary().splitlines()[0]}")
    print(f"input     {'x'.join(str(d) for d in compiled.input_shape)} float32")
    print(f"target    {compiled.spec.name} -> {compiled.spec.key}")
    print(f"          {json.dumps(compiled.spec.to_json()['target'])}")
    print(f"tuned     {tuned}")
    print(f"precision {_precision_line(compiled)}")
    if compiled.plan is not None:
        plan = compiled.plan
        print(f"plan      {args.plan} ({plan.method}, mean density {plan.mean_density:.3f})")
        print(f"sparsity  {sparsity_summary(compiled)}")
    print(f"artifact  {outdir} ({files})")
    if not compiled.spec.runs_locally:
        print("note      this machine cannot run the artifact; copy it to the device")


def _precision_line(compiled) -> str:
    if compiled.precision in ("bf16", "fp16"):
        half = compiled.precision
        return (
            f"{half}: {len(compiled.reduced_layers)} linear layers ({half} inputs and weights, "
            "fp32 sums; LayerNorm, softmax, GELU, attention, patch embedding and head in fp32)"
        )
    if compiled.quantization is None:
        return compiled.precision
    calibration = compiled.quantization.calibration
    layers = len(compiled.quantization.scales)
    return (
        f"int8: {layers} linear layers (int32 sums; LayerNorm, softmax, GELU, attention, patch "
        f"embedding and head in fp32), calibrated on {calibration.get('images')} images of "
        f"{calibration.get('source')} ({calibration.get('rule')} rule)"
    )
