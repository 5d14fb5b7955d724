"""Structurally pruned ViTs on this x86 machine: compiled pruned vs compiled dense (and PyTorch),
side by side in one process, with the FLOPs ratio beside the latency ratio.

For each model and structural budget (magnitude criteria: `vitsparse.pruning.fractions`), makes
the plan, runs ``vitsparse.jobs.bench.bench`` with the dense and pruned rows (PyTorch too, and the
error against the pruned PyTorch model), counts the FLOPs of both (``vitsparse.flops``), and then
times compiled dense and compiled pruned alternately in ``--rounds`` rounds: the headline ratio is
the median over rounds of each round's ratio, so a slow spell of the (shared) machine hits both
sides. Writes ``docs/results/structured_x86.json`` and ``.md``.

    python benchmarks/structured.py        # deit_small: heads+MLP 0.5; tokens 0.7@4,7,10
    python benchmarks/structured.py --models deit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import sys

import _common
import numpy as np

import vitsparse
from vitsparse.devices import set_num_threads
from vitsparse.frontend import load_torch_model
from vitsparse.jobs.compile import compile_model
from vitsparse.pruning import compose_plan, structure_plan

RUNTIMES = _common.PRUNED_ROWS
TITLE = "Structurally pruned ViTs on x86: compiled pruned vs compiled dense"
STEM = "structured_x86"
# name -> structure_plan arguments
BUDGETS = {
    "heads 0.5 + mlp 0.5": {"heads": 0.5, "mlp": 0.5},
    "tokens 0.7@4,7,10": {"tokens": "0.7@4,7,10"},
}


def main(argv: list[str] | None = None) -> int:
    args, threads, command = _common.start(_parser(), "structured.py", argv)
    runs = []
    for model_name in args.models:
        model, model_id = load_torch_model(model_name)
        dense_flops = vitsparse.flops(model)
        for budget in args.budgets:
            structure = structure_plan(model, method="magnitude", **BUDGETS[budget])
            plan = compose_plan(model, model_id=model_id, method="magnitude", structure=structure)
            report = _common.bench_plan(model, plan, args, threads)
            rounds = _interleaved(model, plan, args, threads)
            _common.say(
                f"[structured] {budget}: pruned/dense per round {[round(r, 3) for r in rounds]}"
            )
            runs.append(
                {
                    "model": model_name,
                    "budget": budget,
                    "flops_ratio": vitsparse.flops(model, plan).ratio(dense_flops),
                    "latency_ratio_rounds": rounds,
                    "latency_ratio": float(np.median(rounds)),
                    "report": report,
                }
            )
    _common.write_bench_runs(args.outdir, STEM, command, threads, runs, _markdown)
    return 0


def _interleaved(model, plan, args, threads) -> list[float]:
    """Per round: compiled pruned's median latency over compiled dense's, timed back to back."""
    set_num_threads(threads)
    dense = compile_model(model, target="x86")
    pruned = compile_model(model, target="x86", plan=plan)
    x = np.random.default_rng(0).standard_normal(dense.input_shape, dtype=np.float32)
    rounds = _common.alternate(
        {
            "dense": lambda: dense.time(x, repeat=args.repeat, number=args.number).median_ms,
            "pruned": lambda: pruned.time(x, repeat=args.repeat, number=args.number).median_ms,
        },
        args.rounds,
    )
    return [p / d for p, d in zip(rounds["pruned"], rounds["dense"], strict=True)]


def _markdown(runs, command, date, threads, host) -> str:
    lines = [
        *_common.pruned_page_head(TITLE, host, threads, date),
        "- magnitude criteria (vitsparse.pruning.fractions); torch-pruned is the plan applied to "
        "the PyTorch model (apply_plan_to_torch), the reference tvm-pruned is checked against",
        "- FLOPs: vitsparse.flops (MACs of the matmuls and the patch embedding); latency: median "
        "of `repeat` samples, each the mean of `number` runs, after warm-up",
        "- latency ratio (headline): compiled pruned over compiled dense, timed alternately in "
        "rounds, median of the rounds' ratios; the ms columns and the tables below are from the "
        "one-after-the-other bench run",
        *_common.reproduce_block(command),
        "| model | budget | FLOPs pruned/dense | latency pruned/dense (rounds) | speedup "
        "| latency ratio / FLOPs ratio | tvm-dense ms | tvm-pruned ms | max err vs torch-pruned |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        dense, pruned = (run["report"].row(name) for name in ("tvm-dense", "tvm-pruned"))
        latency = run["latency_ratio"]
        spread = f"{min(run['latency_ratio_rounds']):.3f}-{max(run['latency_ratio_rounds']):.3f}"
        lines.append(
            f"| {run['model']} | {run['budget']} | {run['flops_ratio']:.3f} "
            f"| {latency:.3f} ({spread}) | {1 / latency:.2f}x "
            f"| {latency / run['flops_ratio']:.2f} | {dense.median_ms:.2f} "
            f"| {pruned.median_ms:.2f} | {pruned.max_abs_err_vs_torch:.1e} |"
        )
    lines += ["", ""]
    return "\n".join(lines) + "\n".join(r["report"].to_markdown() for r in runs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"], metavar="NAME")
    p.add_argument(
        "--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS), metavar="BUDGET"
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating dense/pruned timings")
    _common.add_common_args(p, number=5)
    return p


if __name__ == "__main__":
    sys.exit(main())
