"""``vitsparse prune``: a pruning plan (JSON) for a model, by explicit fractions or by a
criterion under a budget; prints what it keeps."""

from __future__ import annotations

import argparse

from vitsparse.cli._common import model_source, output_file, positive_int, say, weights_args
from vitsparse.cli.finetune import data_args
from vitsparse.errors import TrainingError
from vitsparse.pruning import BLOCK_SCORES, CRITERIA
from vitsparse.pruning.criteria import parse_knob_args


def add_parser(commands) -> None:
    p = commands.add_parser("prune", help="make a pruning plan (JSON) for a model")
    p.add_argument("model", metavar="MODEL", help="timm model name")
    p.add_argument(
        "--method",
        required=True,
        type=prune_method,
        metavar="M",
        help="criterion. With explicit fractions (--blocks/--heads/--mlp/--embed/--tokens): "
        "magnitude (largest L1 kept) or random. With --budget: magnitude (uniform baseline; "
        "--knob kind=blocks|structure), lpvit (block masks, Taylor scores allocated across "
        "layers), nvit (Fisher group saliency, global ranking of embedding channels, heads, q/k "
        "and v dims, MLP neurons), upvit (KL leave-one-out channels, uniform ratios), cpvit "
        "(cascade token keep counts and heads from attention) or combined (block masks, heads/"
        "MLP neurons and tokens in one plan, greedy on saving per unit of distortion)",
    )
    p.add_argument(
        "--budget",
        metavar="METRIC=F",
        help="what the criterion keeps: flops=F or params=F (a fraction of the dense model); "
        "latency and energy budgets are measured on a target: `vitsparse search`",
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
    p.add_argument("--calib-size", type=positive_int, default=256, metavar="N")
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
    weights_args(p)
    p.add_argument("-o", "--output", type=output_file, required=True, metavar="PLAN.json")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--finetune-steps",
        type=positive_int,
        metavar="N",
        help="then fine-tune the pruned model for N steps (vitsparse finetune's defaults) on "
        "--data, into --finetune-out",
    )
    budget.add_argument("--finetune-epochs", type=positive_int, metavar="E", help="or E epochs")
    data_args(p, "--data", required=False)
    p.add_argument(
        "--finetune-out",
        metavar="OUTDIR",
        help="the fine-tune's output (default: PLAN-finetuned beside -o)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.jobs.prune import prune_and_predict

    finetune = _finetune_options(args)
    if finetune is not None:
        say(_resume_hint(args, finetune))
    result = prune_and_predict(
        model_source(args.model),
        finetune=finetune,
        plan_out=args.output,
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
        progress=say,
        layers=args.layers,
        seed=args.seed,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights_seed=args.weights_seed,
    )
    plan = result.plan
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
    _print_prediction(result.prediction)
    print(f"plan      {args.output}")
    if result.finetuned is not None:
        print(result.finetuned.summary())


def _finetune_options(args: argparse.Namespace) -> dict | None:
    """`vitsparse.jobs.finetune.finetune`'s options from --finetune-* and --data (None when no
    fine-tune is asked for); TrainingError when they do not go together."""
    wanted = args.finetune_steps or args.finetune_epochs
    if not wanted:
        if args.data is not None or args.finetune_out is not None:
            raise TrainingError(
                "--data and --finetune-out go with --finetune-steps N or --finetune-epochs E"
            )
        return None
    if args.data is None:
        raise TrainingError("--finetune-steps/--finetune-epochs need --data SRC to train on")
    out = args.finetune_out or args.output.with_name(f"{args.output.stem}-finetuned")
    return {
        "data": args.data,
        "out": out,
        "steps": args.finetune_steps,
        "epochs": args.finetune_epochs,
    }


def _resume_hint(args: argparse.Namespace, finetune: dict) -> str:
    """How to resume the fine-tune after an interruption (or why it cannot be)."""
    weights = f" --checkpoint {args.checkpoint}" if args.checkpoint else ""
    weights += " --pretrained" if args.pretrained else ""
    budget = (
        f"--steps {finetune['steps']}" if finetune["steps"] else f"--epochs {finetune['epochs']}"
    )
    return (
        f"[prune] the plan goes to {args.output} before the fine-tune; to resume an interrupted "
        f"one: vitsparse finetune {args.model}{weights} --plan {args.output} --data "
        f"{finetune['data']} {budget} -o {finetune['out']} --resume"
    )


def _print_prediction(kept) -> None:
    """Predicted FLOPs and weights of the pruned model, and, where measured, its fidelity."""
    print(f"predicted {kept.flops_kept:.1%} of the model's FLOPs kept ({kept.macs:,} MACs)")
    print(f"predicted {kept.params_kept:.1%} of the model's weights kept ({kept.params:,})")
    if kept.agreement is not None:
        print(
            f"fidelity  on {kept.fidelity_data} ({kept.fidelity_images} images): top-1 agreement "
            f"{kept.agreement:.1%}, mean KL {kept.mean_kl:.4f}"
        )


def prune_method(text: str) -> str:
    known = list(dict.fromkeys([*BLOCK_SCORES, *CRITERIA]))
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; known: {', '.join(known)}")
    return text
