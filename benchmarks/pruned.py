"""End-to-end block-pruned ViT on this x86 machine: PyTorch eager (dense and pruned) vs TVM
(dense and pruned), measured side by side in one process.

For each model and block spec, makes a plan with every qkv/proj/fc1/fc2 layer keeping the given
fraction of its blocks (random and magnitude masks), and runs ``vitsparse.jobs.bench.bench``
with the dense and pruned rows. Writes ``docs/results/pruned_x86.json`` and
``docs/results/pruned_x86.md``.

    python benchmarks/pruned.py            # deit_small, 32x32 blocks, keep 0.5
    python benchmarks/pruned.py --models deit_tiny_patch16_224 --blocks 32x32:0.3
"""

from __future__ import annotations

import argparse
import sys

import _common

from vitsparse.frontend import load_torch_model
from vitsparse.pruning import block_mask_plan, parse_block_spec

RUNTIMES = _common.PRUNED_ROWS
TITLE = "Block-pruned ViTs on x86: TVM with BSR kernels vs dense, and vs PyTorch"
STEM = "pruned_x86"


def main(argv: list[str] | None = None) -> int:
    args, threads, command = _common.start(_parser(), "pruned.py", argv)
    runs = []
    for model_name in args.models:
        model, model_id = load_torch_model(model_name)  # one set of (random) weights per model
        for spec in args.blocks:
            block, keep = parse_block_spec(spec)
            for method in args.methods:
                plan = block_mask_plan(
                    model, model_id=model_id, block=block, keep=keep, method=method, seed=0
                )
                report = _common.bench_plan(model, plan, args, threads)
                runs.append(
                    {"model": model_name, "blocks": spec, "method": method, "report": report}
                )
    _common.write_bench_runs(args.outdir, STEM, command, threads, runs, _markdown)
    return 0


def _markdown(runs, command, date, threads, host) -> str:
    lines = [
        *_common.pruned_page_head(TITLE, host, threads, date),
        "- every qkv/proj/fc1/fc2 layer keeps the given fraction of its blocks; torch-pruned is "
        "the masked model in PyTorch (dense kernels on zeroed weights), and the reference that "
        "tvm-pruned is checked against",
        "- latency: median of `repeat` samples, each the mean of `number` runs, after warm-up",
        *_common.reproduce_block(command),
        "| model | blocks:keep | mask | torch-eager ms | torch-pruned ms | tvm-dense ms "
        "| tvm-pruned ms | pruned vs tvm-dense | pruned vs torch-eager | max err vs torch-pruned |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        ms = {name: run["report"].row(name).median_ms for name in RUNTIMES}
        err = run["report"].row("tvm-pruned").max_abs_err_vs_torch
        lines.append(
            f"| {run['model']} | {run['blocks']} | {run['method']} | {ms['torch-eager']:.2f} "
            f"| {ms['torch-pruned']:.2f} | {ms['tvm-dense']:.2f} | {ms['tvm-pruned']:.2f} "
            f"| {ms['tvm-dense'] / ms['tvm-pruned']:.2f}x "
            f"| {ms['torch-eager'] / ms['tvm-pruned']:.2f}x | {err:.1e} |"
        )
    lines += ["", "Speedups are the other runtime's median over tvm-pruned's median.", "", ""]
    return "\n".join(lines) + "\n".join(r["report"].to_markdown() for r in runs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"], metavar="NAME")
    p.add_argument("--blocks", nargs="+", default=["32x32:0.5"], metavar="RxC:KEEP")
    p.add_argument(
        "--methods", nargs="+", default=["random", "magnitude"], choices=["random", "magnitude"]
    )
    _common.add_common_args(p, number=5)
    return p


if __name__ == "__main__":
    sys.exit(main())
