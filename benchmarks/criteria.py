"""Pruning criteria compared at equal FLOPs budgets: accuracy and fidelity versus kept FLOPs.

For the built-in digits ViT (trained here; accuracy on its held-out split, calibration on its
training split) and deit_tiny (random weights: fidelity only, on synthetic images), and for kept
FLOPs from 90% to 30%, makes each criterion's plan and measures the pruned model in PyTorch (the
compiled model equals it; the tests check that): top-1 where there are labels, and always the
fidelity to the dense model (top-1 agreement, mean KL). Criteria: the uniform magnitude block
baseline and LPViT (16x16 blocks), and UP-ViT (structures; digits ViT only). Writes
docs/results/criteria.{json,md,png}.

    python benchmarks/criteria.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from _common import RESULTS, reproduce_block

import vitsparse
from vitsparse._io import write_text_atomic
from vitsparse.data.sources import load_images
from vitsparse.evaluate import evaluate
from vitsparse.frontend import load_torch_model
from vitsparse.pruning.block_mask import block_mask_plan_for_budget
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.lpvit import lpvit_plan
from vitsparse.pruning.upvit import upvit_plan
from vitsparse.report import host_info

STEM = "criteria"
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
MODELS = {
    # name -> (calibration source, evaluation source, criteria). UP-ViT needs one forward pass
    # per channel: ~9,400 of them for deit_tiny, beyond this benchmark's time budget on 2 cores.
    "vitsparse/digits_vit": ("digits-train", "digits", ("magnitude", "lpvit", "upvit")),
    "deit_tiny_patch16_224": ("synthetic", "synthetic", ("magnitude", "lpvit")),
}
UPVIT_PROXY = 50  # images for UP-ViT's leave-one-out passes


def _plans(model, model_id, calib, budget, methods):
    if "magnitude" in methods:
        yield "magnitude", block_mask_plan_for_budget(model, budget, model_id=model_id)
    if "lpvit" in methods:
        yield "lpvit", lpvit_plan(model, calib, budget, model_id=model_id)
    if "upvit" in methods:
        yield "upvit", upvit_plan(model, calib[:UPVIT_PROXY], budget, model_id=model_id)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = shlex.join(
        ["python", "benchmarks/criteria.py", *(sys.argv[1:] if argv is None else argv)]
    )
    rows = []
    for name in args.models:
        model, model_id = load_torch_model(name)
        size = model.patch_embed.img_size[0]
        calib_src, eval_src, methods = MODELS[name]
        calib = load_images(calib_src, image_size=size, limit=args.calib_size, seed=1).images
        data = load_images(eval_src, image_size=size, limit=args.eval_size, seed=2)
        dense = vitsparse.flops(model)
        for fraction in args.budgets:
            budget = Budget("flops", fraction)
            for method, plan in _plans(model, model_id, calib, budget, methods):
                report = evaluate(model, data, plan)
                row = {
                    "model": name,
                    "method": method,
                    "budget": fraction,
                    "kept_flops": vitsparse.flops(model, plan).ratio(dense),
                    **report.to_json(),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    suite = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": host_info(),
        "rows": rows,
    }
    outdir = Path(args.outdir)
    _plot(rows, outdir / f"{STEM}.png")
    write_text_atomic(outdir / f"{STEM}.json", json.dumps(suite, indent=2) + "\n")
    write_text_atomic(outdir / f"{STEM}.md", _markdown(suite))
    print(f"wrote {outdir / STEM}.json, .md and .png", file=sys.stderr)
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        labelled = any(r["top1_pruned"] is not None for r in rows if r["model"] == model)
        key, label = ("top1_pruned", "top-1") if labelled else ("agreement", "top-1 agreement")
        for method in sorted({r["method"] for r in rows}):
            pts = sorted(
                (r["kept_flops"], r[key])
                for r in rows
                if r["model"] == model and r["method"] == method
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set(title=model, xlabel="kept FLOPs", ylabel=label)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _markdown(suite) -> str:
    host = suite["host"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        "# Pruning criteria at equal FLOPs budgets",
        "",
        f"- host: {host['cpu_model']}; date {suite['date']}",
        "- accuracy and fidelity of the pruned model in PyTorch (the compiled model equals it); "
        "digits ViT: trained here, top-1 on its held-out split, calibration on its training split; "
        "deit_tiny: random weights, so fidelity only, on synthetic images (its near-uniform "
        "outputs make top-1 agreement unstable there; mean KL is the measure that means something)",
        "- magnitude: every layer keeps the same fraction of its 16x16 blocks (largest L1), the "
        "largest fraction within the budget; lpvit: vitsparse.pruning.lpvit, 16x16 blocks; "
        f"upvit: vitsparse.pruning.upvit, {UPVIT_PROXY} proxy images, digits ViT only (one "
        "forward pass per channel is ~9,400 passes for deit_tiny, beyond this run on 2 cores)",
        *reproduce_block(suite["command"]),
        "![accuracy or agreement vs kept FLOPs](criteria.png)",
        "",
        "| model | budget | method | kept FLOPs | top-1 dense | top-1 pruned | agreement "
        "| mean KL |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in suite["rows"]:
        lines.append(
            f"| {r['model']} | {r['budget']:.1f} | {r['method']} | {r['kept_flops']:.3f} "
            f"| {pct(r['top1_dense'])} | {pct(r['top1_pruned'])} | {pct(r['agreement'])} "
            f"| {r['mean_kl']:.4f} |"
        )
    lines += ["", "## Where a paper method does not beat the baseline", ""]
    for model in sorted({r["model"] for r in suite["rows"]}):
        key = (
            "top1_pruned"
            if any(r["top1_pruned"] is not None for r in suite["rows"] if r["model"] == model)
            else "mean_kl"
        )
        better = (lambda a, b: a >= b) if key == "top1_pruned" else (lambda a, b: a <= b)
        by = {(r["budget"], r["method"]): r[key] for r in suite["rows"] if r["model"] == model}
        for paper in sorted({m for (_, m) in by} - {"magnitude"}):
            losses = [
                f"{budget:.1f}"
                for (budget, method), value in sorted(by.items())
                if method == paper and not better(value, by[(budget, "magnitude")])
            ]
            what = "top-1" if key == "top1_pruned" else "mean KL"
            lines.append(
                f"- {model} ({what}): {paper} is worse than magnitude at budget(s) "
                f"{', '.join(losses)}."
                if losses
                else f"- {model} ({what}): {paper} matches or beats magnitude at every budget."
            )
    lines += [
        "",
        "Why lpvit loses where it does (our reading of the plans, not a measured "
        "attribution): lpvit subtracts the FLOPs "
        "each layer saves, scaled by the paper's auto-scaled beta, from its distortion slope. "
        "The MLP layers save the most per block, so at mid budgets the allocation drives some of "
        "them (the first block's fc1/fc2 on the digits ViT) to the per-layer cap, which costs more "
        "accuracy than spreading the sparsity; at small budgets that concentration is what keeps "
        "the attention layers intact and lpvit wins. The post-training plans are not fine-tuned.",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--outdir", default=str(RESULTS), metavar="DIR")
    return p


if __name__ == "__main__":
    sys.exit(main())
