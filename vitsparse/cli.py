"""The ``vitsparse`` command line: a thin layer over the Python API.

Each command parses its arguments, makes one API call and prints the result. Errors in the user's
input (VitsparseError, missing files) print ``vitsparse: error: <message>`` and exit with status
2, as argparse does for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vitsparse.errors import ArtifactError, ModelError, PlanError, TargetError, VitsparseError

DEMO_MODEL = "deit_tiny_patch16_224"
DIGITS_MODEL = "vitsparse/digits_vit"  # vitsparse.data.digits.DIGITS_MODEL (not imported: torch)
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (VitsparseError, OSError) as err:
        print(f"vitsparse: error: {_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vitsparse: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (each subparser sets ``run``)."""
    from vitsparse import __version__

    parser = argparse.ArgumentParser(
        prog="vitsparse",
        description="Compile Vision Transformers with Apache TVM and compare them with PyTorch "
        "and ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"vitsparse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("compile", help="compile a model into a deployable artifact")
    _model_args(p)
    _target_args(p)
    p.add_argument("--db", metavar="DIR", help="tuning database root (from `vitsparse tune`)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the module after each phase here")
    p.add_argument("--plan", metavar="PLAN.json", help="compile the model pruned by this plan")
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="artifact directory")
    p.set_defaults(run=_compile)

    p = commands.add_parser("bench", help="time the model under PyTorch, ONNX Runtime and TVM")
    _model_args(p)
    _target_args(p)
    _timing_args(p)
    p.add_argument("--db", metavar="DIR", help="tuning database root (from `vitsparse tune`)")
    p.add_argument(
        "--runtimes",
        type=_runtime_list,
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
    _rpc_args(p, "measure the TVM rows on a device of KEY (PyTorch/ONNX Runtime stay here)")
    p.add_argument("--json", type=_output_file, metavar="FILE", help="write the report as JSON")
    p.add_argument("--markdown", type=_output_file, metavar="FILE", help="write it as markdown")
    p.set_defaults(run=_bench)

    p = commands.add_parser("tune", help="tune the model's kernels into a database")
    _model_args(p)
    _target_args(p)
    p.add_argument("--db", metavar="DIR", required=True, help="tuning database root")
    p.add_argument("--trials", type=_positive_int, metavar="N", help="total trial budget")
    p.add_argument(
        "--plan", metavar="PLAN.json", help="tune the model pruned by this plan (BSR kernels too)"
    )
    _rpc_args(p, "build here, measure every candidate on a device of KEY")
    p.set_defaults(run=_tune)

    p = commands.add_parser(
        "profile", help="measure a target's cost table (kernels and blocks over grids)"
    )
    _target_args(p)
    p.add_argument("-o", "--output", metavar="COST.json", required=True, help="the cost table")
    p.add_argument(
        "--grid",
        default="default",
        choices=("default", "small"),
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
    _rpc_args(p, "build here, measure every point on a device of KEY")
    p.set_defaults(run=_profile)

    p = commands.add_parser("rpc", help="a local RPC tracker or device server, for testing")
    rpc_commands = p.add_subparsers(dest="rpc_command", required=True, metavar="WHAT")
    q = rpc_commands.add_parser("tracker", help="run an RPC tracker until interrupted")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    q.add_argument("--port", type=_positive_int, default=9190, help="first port to try")
    q.set_defaults(run=_rpc_tracker)
    q = rpc_commands.add_parser(
        "server", help="run an RPC server for this machine, registered under a key"
    )
    q.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the tracker")
    q.add_argument(
        "--key", metavar="KEY", help="device key, e.g. jetson-orin (required; --qemu: arm-qemu)"
    )
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    q.add_argument("--port", type=_positive_int, default=9090, help="first port to try")
    q.add_argument(
        "--qemu",
        action="store_true",
        help="serve an emulated aarch64 device under qemu-user instead of this machine "
        "(scripts/setup_arm_qemu.sh builds it); its latencies are reported as emulated",
    )
    q.set_defaults(run=_rpc_server)

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
    p.add_argument("--limit", type=_positive_int, metavar="N", help="use at most N images")
    p.add_argument("--checkpoint", metavar="FILE", help="torch.save'd weights for MODEL")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    p.add_argument("--json", type=_output_file, metavar="FILE", help="write the report as JSON")
    p.set_defaults(run=_eval)

    from vitsparse.pruning.criteria import CRITERIA  # the registry is cheap to import

    p = commands.add_parser("prune", help="make a pruning plan (JSON) for a model")
    p.add_argument("model", metavar="MODEL", help="timm model name")
    p.add_argument(
        "--method",
        required=True,
        type=_prune_method,
        metavar="M",
        help="criterion. With explicit fractions (--blocks/--heads/--mlp/--embed/--tokens): "
        "magnitude (largest L1 kept) or random. With --budget: magnitude (uniform baseline; "
        "--knob kind=blocks|structure), lpvit (block masks, Taylor scores allocated across "
        "layers), nvit (Fisher group saliency, global ranking of embedding channels, heads, q/k "
        "and v dims, MLP neurons), upvit (KL leave-one-out channels, uniform ratios) or cpvit "
        "(cascade token keep counts and heads from attention)",
    )
    p.add_argument(
        "--budget",
        metavar="METRIC=F",
        help="what the criterion keeps: flops=F or params=F (a fraction of the dense model)",
    )
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a criterion knob, repeatable: "
        + ", ".join(f"{c.name} {'/'.join(c.knobs)}" for c in CRITERIA.values())
        + " (cost=COST.json: a `vitsparse profile` table as the cost model)",
    )
    p.add_argument(
        "--calib",
        metavar="SRC",
        help="calibration images for the budgeted criteria: ImageFolder directory, "
        "'digits-train', 'digits' or 'synthetic' (default)",
    )
    p.add_argument("--calib-size", type=_positive_int, default=256, metavar="N")
    p.add_argument(
        "--blocks",
        metavar="RxC:KEEP",
        help="block size and the fraction of blocks each layer keeps, e.g. 32x32:0.5; with "
        "--budget, the block size only (lpvit, magnitude), e.g. 16x16",
    )
    p.add_argument("--heads", type=float, metavar="F", help="fraction of each block's heads kept")
    p.add_argument("--mlp", type=float, metavar="F", help="fraction of MLP neurons kept")
    p.add_argument("--embed", type=float, metavar="F", help="fraction of embedding channels kept")
    p.add_argument(
        "--tokens",
        metavar="KEEP@BLOCKS",
        help="keep this fraction of the patch tokens after each listed block (1-based), "
        "e.g. 0.7@4,7,10",
    )
    p.add_argument(
        "--token-rule",
        default="cls_attention",
        choices=["cls_attention", "cumulative_attention"],
        help="token score: class-token attention (EViT) or cumulative attention (CP-ViT)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="fnmatch patterns on linear layer names (default: qkv/proj/fc1/fc2 of every block)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of --method random")
    p.add_argument("--checkpoint", metavar="FILE", help="torch.save'd weights for MODEL")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    p.add_argument("-o", "--output", type=_output_file, required=True, metavar="PLAN.json")
    p.set_defaults(run=_prune)

    p = commands.add_parser(
        "demo", help=f"compare PyTorch, ONNX Runtime and TVM on {DEMO_MODEL} for this CPU"
    )
    p.add_argument("--model", default=DEMO_MODEL, help=f"timm model name (default {DEMO_MODEL})")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="use timm's pretrained weights if they can be fetched (default: random weights)",
    )
    _timing_args(p)
    p.set_defaults(run=_demo)

    p = commands.add_parser("targets", help="list the target presets as resolved on this machine")
    p.set_defaults(run=_targets)
    return parser


# --- commands ------------------------------------------------------------------------------


def _compile(args: argparse.Namespace) -> None:
    from vitsparse.compiler import ARTIFACT_MANIFEST, compile_model

    outdir = Path(args.output)
    _check_artifact_dir(outdir, ARTIFACT_MANIFEST)
    _say(f"[compile] compiling {args.model} for {args.target} ...")
    compiled = compile_model(
        _model_source(args.model),
        target=args.target,
        batch=args.batch,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        cuda_arch=args.cuda_arch,
        db=args.db,
        plan=args.plan,
        dump_dir=args.dump_ir,
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
    if compiled.plan is not None:
        from vitsparse.report import sparsity_summary

        plan = compiled.plan
        print(f"plan      {args.plan} ({plan.method}, mean density {plan.mean_density:.3f})")
        print(f"sparsity  {sparsity_summary(compiled)}")
    print(f"artifact  {outdir} ({files})")
    if not compiled.spec.runs_locally:
        print("note      this machine cannot run the artifact; copy it to the device")


def _bench(args: argparse.Namespace) -> None:
    from vitsparse.report import PRUNED_RUNTIMES, bench

    pruned = [name for name in args.runtimes or () if name in PRUNED_RUNTIMES]
    if pruned and args.plan is None:
        raise PlanError(f"runtime(s) {', '.join(pruned)} need a pruning plan: add --plan PLAN.json")
    report = bench(
        _model_source(args.model),
        target=args.target,
        batch=args.batch,
        threads=args.threads,
        repeat=args.repeat,
        number=args.number,
        db=args.db,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        cuda_arch=args.cuda_arch,
        include=args.runtimes,
        plan=args.plan,
        energy_seconds=args.energy_seconds,
        rpc=_rpc_device(args),
        progress=_say,
    )
    print(report.table())
    _write_report(report, json_path=args.json, markdown_path=args.markdown)


def _tune(args: argparse.Namespace) -> None:
    from vitsparse.schedules.tuning import tune  # imported late: tuning pulls in MetaSchedule

    report = tune(
        _model_source(args.model),
        target=args.target,
        db=args.db,
        trials=args.trials,
        batch=args.batch,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        cuda_arch=args.cuda_arch,
        plan=args.plan,
        rpc=_rpc_device(args),
        progress=_say,
    )
    print(report.summary())


def _profile(args: argparse.Namespace) -> None:
    from vitsparse.targets.profile import profile

    table = profile(
        args.target,
        args.output,
        grid=args.grid,
        rpc=_rpc_device(args),
        cuda_arch=args.cuda_arch,
        energy_seconds=args.energy_seconds,
        progress=_say,
    )
    print(f"cost table of {table.target['key']} on {table.device} -> {args.output}")


def _rpc_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help=f"RPC tracker: {what}")
    p.add_argument("--key", metavar="KEY", help="device key at the tracker (with --rpc)")


def _rpc_device(args: argparse.Namespace):
    if args.rpc is None and args.key is None:
        return None
    if args.rpc is None or args.key is None:
        raise TargetError("--rpc HOST:PORT and --key KEY go together")
    from vitsparse.targets.rpc import RpcDevice, parse_address

    parse_address(args.rpc)
    return RpcDevice(args.rpc, args.key)


def _rpc_tracker(args: argparse.Namespace) -> None:
    from vitsparse.targets.rpc import start_tracker

    tracker = start_tracker(args.host, args.port)
    print(f"tracker   {args.host}:{tracker.port} (Ctrl-C stops it)", flush=True)
    _wait(tracker)


def _rpc_server(args: argparse.Namespace) -> None:
    from vitsparse.targets.rpc import parse_address, start_server

    parse_address(args.tracker)
    if args.qemu:
        from vitsparse.targets.qemu import ARM_QEMU_KEY, start_arm_server

        key = args.key or ARM_QEMU_KEY
        print(f"[rpc] starting the emulated aarch64 device (qemu-user) as {key!r} ...", flush=True)
        server = start_arm_server(args.tracker, key, host=args.host, port=args.port)
        what = "emulated aarch64 (qemu-user)"
    else:
        if args.key is None:
            raise TargetError("rpc server needs --key KEY (the name clients ask the tracker for)")
        key = args.key
        server = start_server(args.tracker, key, host=args.host, port=args.port)
        what = "this machine"
    print(
        f"server    {args.host}:{server.port}, key {key}, {what}, tracker {args.tracker} "
        "(Ctrl-C stops it)",
        flush=True,
    )
    _wait(server)


def _wait(process) -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        process.terminate()


def _prune(args: argparse.Namespace) -> None:
    from vitsparse.pruning import prune
    from vitsparse.pruning.criteria import parse_knob_args

    plan = prune(
        _model_source(args.model),
        method=args.method,
        blocks=args.blocks,
        heads=args.heads,
        mlp=args.mlp,
        embed=args.embed,
        tokens=args.tokens,
        token_rule=args.token_rule,
        budget=args.budget,
        calib=args.calib,
        calib_size=args.calib_size,
        knobs=parse_knob_args(args.knob),
        progress=_say,
        layers=args.layers,
        seed=args.seed,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
    )
    plan.save(args.output)
    print(f"model     {plan.model_id} (weights {plan.weights_hash[:19]}...)")
    seed = f", seed {args.seed}" if plan.method == "random" else ""
    print(f"method    {plan.method}{seed}")
    kept = plan.budget.get("structure", {})
    if "embed" in kept:
        print(f"embed     {kept['embed']} channels kept")
    for name in ("heads", "qk_dims", "v_dims", "mlp"):
        if name in kept:
            print(f"{name:9} kept per block: {', '.join(map(str, kept[name]))}")
    if "tokens" in kept:
        after = ", ".join(f"{n} after block {int(b) + 1}" for b, n in kept["tokens"].items())
        rules = {b.tokens.rule for b in plan.structure.blocks.values() if b.tokens is not None}
        print(f"tokens    patch tokens kept: {after} ({', '.join(sorted(rules))})")
    if kept and not plan.layers and args.budget is not None:
        chosen = ", ".join(
            f"{k}={v}" for k, v in plan.budget.items() if k not in ("structure", "seed")
        )
        print(f"budget    {chosen}")
    if plan.layers:
        densities = [mask.density for mask in plan.layers.values()]
        if "keep" in plan.budget:
            names = ", ".join(plan.budget["layers"])
            print(f"layers    {len(plan.layers)} linear layers ({names})")
            print(f"blocks    {plan.budget['blocks']}, keep {plan.budget['keep']:g}")
        else:
            budget = ", ".join(f"{k}={v}" for k, v in plan.budget.items() if k != "beta")
            print(f"layers    {len(plan.layers)} linear layers, densities chosen by {plan.method}")
            print(f"budget    {budget}")
        print(
            f"density   mean {plan.mean_density:.3f} (min {min(densities):.3f}, "
            f"max {max(densities):.3f})"
        )
        print(f"flops     {plan.kept_mac_fraction:.1%} of the masked layers' multiply-adds kept")
    _print_prediction(args, plan)
    print(f"plan      {args.output}")
    if args.checkpoint is None and not args.pretrained and args.model != DIGITS_MODEL:
        print(
            "note      timm's random weights (no --checkpoint/--pretrained): the plan's weights "
            "hash matches no other instance of the model"
        )


def _eval(args: argparse.Namespace) -> None:
    from vitsparse.data.sources import load_images
    from vitsparse.evaluate import evaluate
    from vitsparse.frontend import load_torch_model
    from vitsparse.plan import load_plan

    plan = load_plan(args.plan)  # a bad plan file fails before the model loads
    model, model_id = load_torch_model(
        _model_source(args.model), checkpoint=args.checkpoint, pretrained=args.pretrained
    )
    size = model.patch_embed.img_size[0]
    data = load_images(args.data, image_size=size, limit=args.limit)
    report = evaluate(model, data, plan)
    print(f"model     {model_id}")
    print(report.summary())
    if args.json is not None:
        from vitsparse._io import write_text_atomic

        write_text_atomic(args.json, json.dumps(report.to_json(), indent=2) + "\n")


def _print_prediction(args: argparse.Namespace, plan) -> None:
    """Predicted FLOPs of the pruned model; with --calib and reproducible weights (a checkpoint,
    pretrained or the built-in model), its fidelity to the dense model on those images."""
    from vitsparse.flop_count import flops, params
    from vitsparse.frontend import load_torch_model

    model, _ = load_torch_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    kept = flops(model, plan).ratio(flops(model))
    print(f"predicted {kept:.1%} of the model's FLOPs kept ({flops(model, plan).macs:,} MACs)")
    weights = params(model, plan)
    print(f"predicted {weights / params(model):.1%} of the model's weights kept ({weights:,})")
    reproducible = args.checkpoint or args.pretrained or args.model == DIGITS_MODEL
    if args.calib and reproducible:
        from vitsparse.data.sources import load_images
        from vitsparse.evaluate import evaluate

        size = model.patch_embed.img_size[0]
        data = load_images(args.calib, image_size=size, limit=args.calib_size)
        report = evaluate(model, data, plan)
        print(
            f"fidelity  on {data.name} ({len(data)} images): top-1 agreement "
            f"{report.agreement:.1%}, mean KL {report.mean_kl:.4f}"
        )


def _demo(args: argparse.Namespace) -> None:
    from vitsparse.frontend import load_torch_model
    from vitsparse.report import bench

    pretrained = False
    if args.pretrained:
        try:
            load_torch_model(args.model, pretrained=True)
            pretrained = True
        except ModelError as err:
            _say(f"[demo] {err}; using random weights")
    report = bench(
        args.model,
        target="x86",
        pretrained=pretrained,
        threads=args.threads,
        repeat=args.repeat,
        number=args.number,
        progress=_say,
    )
    print(report.table())


def _targets(args: argparse.Namespace) -> None:
    from vitsparse.targets import PRESETS, list_presets, resolve_target

    for name in list_presets():
        print(f"{name}: {PRESETS[name].description}")
        try:
            spec = resolve_target(name)
        except VitsparseError as err:
            print(f"  not available here: {err}\n")
            continue
        compilers = [c for c in (spec.cross_compiler, spec.device_compiler) if c]
        print(f"  key        {spec.key}")
        print(f"  target     {json.dumps(spec.to_json()['target'])}")
        print(f"  runs here  {'yes' if spec.runs_locally else 'no'}")
        print(f"  toolchain  {', '.join(compilers) or 'host C++ compiler'}\n")


# --- arguments -----------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="timm model name or path to an .onnx file")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size")
    p.add_argument("--checkpoint", metavar="FILE", help="torch.save'd weights for MODEL")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="x86",
        metavar="T",
        help="preset (`vitsparse targets` lists them) or a TVM target dict as JSON (default x86)",
    )
    p.add_argument("--cuda-arch", metavar="sm_XX", help="CUDA arch for --target cuda")


def _timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, metavar="N", help="default: all CPUs")
    p.add_argument("--repeat", type=_positive_int, default=10, metavar="R", help="samples")
    p.add_argument("--number", type=_positive_int, default=5, metavar="N", help="runs/sample")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _prune_method(text: str) -> str:
    from vitsparse.pruning import BLOCK_SCORES
    from vitsparse.pruning.criteria import CRITERIA

    known = list(dict.fromkeys([*BLOCK_SCORES, *CRITERIA]))
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; known: {', '.join(known)}")
    return text


def _runtime_list(text: str) -> tuple[str, ...]:
    from vitsparse.report import KNOWN_RUNTIMES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in KNOWN_RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown runtime(s) {unknown}; known: {', '.join(KNOWN_RUNTIMES)}"
        )
    return names


def _output_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file name")
    return path


# --- helpers -------------------------------------------------------------------------------


def _model_source(text: str) -> str:
    """MODEL as the API takes it; a path to a file other than .onnx gets a pointed message."""
    path = Path(text)
    if not text.lower().endswith(".onnx") and (path.suffix or "/" in text) and path.exists():
        raise ModelError(
            f"{text!r} is a file, but only .onnx files can be given as MODEL; for PyTorch "
            "weights give the timm model name and --checkpoint FILE"
        )
    return text


def _check_artifact_dir(outdir: Path, manifest: str) -> None:
    """Refuse to replace anything but an earlier artifact (export swaps the whole directory)."""
    if outdir.exists() and not outdir.is_dir():
        raise ArtifactError(f"output {str(outdir)!r} exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / manifest).is_file():
        raise ArtifactError(
            f"output directory {str(outdir)!r} is not empty and holds no vitsparse artifact "
            f"({manifest}); refusing to replace it, choose another -o"
        )


def _write_report(report, *, json_path: Path | None, markdown_path: Path | None) -> None:
    from vitsparse.report import write_text_atomic

    if json_path is not None:
        write_text_atomic(json_path, json.dumps(report.to_json(), indent=2) + "\n")
        _say(f"[bench] wrote {json_path}")
    if markdown_path is not None:
        write_text_atomic(markdown_path, report.to_markdown())
        _say(f"[bench] wrote {markdown_path}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
