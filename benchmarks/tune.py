"""Tuning job benchmark: how long the default budget takes, and what it buys.

Runs ``vitsparse.tune`` on each model with the default trial budget into a fresh database (or
continues one given with --db), then compiles the model twice (hand-written schedules only, and
with the tuned database) and times both side by side with PyTorch eager in one process. Writes
``docs/results/tune_x86.json`` and ``docs/results/tune_x86.md``.

    python benchmarks/tune.py                                  # deit_small, default budget
    python benchmarks/tune.py --models deit_tiny_patch16_224 --trials 64
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_common_args, reproduce_block

from vitsparse.compiler import compile_imported, set_num_threads
from vitsparse.frontend import import_model
from vitsparse.report import host_info, write_text_atomic
from vitsparse.schedules.tuning import tune

TARGET = "x86"
STEM = "tune_x86"


def _torch_ms(model, x, *, repeat, number) -> float:
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        for _ in range(3):
            model(xt)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                model(xt)
            samples.append((time.perf_counter() - start) / number)
    return float(np.median(samples) * 1e3)


def _run(model_name: str, db: Path, args) -> dict:
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report = tune(model_name, target=TARGET, db=db, trials=args.trials, progress=say)
    imported = import_model(model_name)
    x = np.random.default_rng(0).standard_normal(imported.input_shape, dtype=np.float32)
    hand = compile_imported(imported, target=TARGET)
    tuned = compile_imported(imported, target=TARGET, db=db)
    with torch.inference_mode():
        ref = imported.torch_model(torch.from_numpy(x)).numpy()
    errors = {
        "hand": float(np.abs(hand.run(x) - ref).max()),
        "tuned": float(np.abs(tuned.run(x) - ref).max()),
    }
    # Interleave the three so that machine noise hits them alike; median of the rounds.
    rounds = {"torch-eager": [], "tvm-hand": [], "tvm-tuned": []}
    for _ in range(args.rounds):
        rounds["torch-eager"].append(
            _torch_ms(imported.torch_model, x, repeat=args.repeat, number=args.number)
        )
        rounds["tvm-hand"].append(hand.time(x, repeat=args.repeat, number=args.number).median_ms)
        rounds["tvm-tuned"].append(tuned.time(x, repeat=args.repeat, number=args.number).median_ms)
    medians = {k: float(np.median(v)) for k, v in rounds.items()}
    return {
        "model": model_name,
        "tune": report.to_json(),
        "tuned_kernels": tuned.tuned_kernels,
        "max_abs_err_vs_torch": errors,
        "median_ms": medians,
        "rounds_ms": rounds,
    }


def _markdown(results, command, date, threads, host) -> str:
    lines = [
        "# Tuning on x86: default budget, time taken and what it buys",
        "",
        f"- host: {host['cpu_model']} (LLVM `{host['llvm_cpu']}`, {host['simd']}), "
        f"{threads} threads; date {date}",
        "- tvm-hand: hand-written schedules only; tvm-tuned: with the tuning database (each "
        "kernel's best record, the hand schedule included as a record)",
        f"- latency: median over {results[0]['rounds']} interleaved rounds (torch, hand, tuned), "
        "each round the median of `repeat` samples of `number` runs; batch 1",
        *reproduce_block(command),
        "| model | budget (trials) | tuning time | kernels | torch ms | tvm-hand ms | tvm-tuned ms "
        "| tuned / hand | tuned / torch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        t, m = r["tune"], r["median_ms"]
        lines.append(
            f"| {r['model']} | {t['budget_trials']} | {t['seconds'] / 60:.1f} min "
            f"| {len(t['kernels'])} | {m['torch-eager']:.2f} | {m['tvm-hand']:.2f} "
            f"| {m['tvm-tuned']:.2f} | {m['tvm-tuned'] / m['tvm-hand']:.2f} "
            f"| {m['tvm-tuned'] / m['torch-eager']:.2f} |"
        )
    for r in results:
        lines += [
            "",
            f"## {r['model']}: per kernel (hand schedule vs best record)",
            "",
            f"max abs error vs PyTorch: hand {r['max_abs_err_vs_torch']['hand']:.1e}, "
            f"tuned {r['max_abs_err_vs_torch']['tuned']:.1e}",
            "",
            "| kernel | calls | trials | hand ms | best ms |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for k in r["tune"]["kernels"]:
            hand = "-" if k["hand_ms"] is None else f"{k['hand_ms']:.4f}"
            best = "-" if k["best_ms"] is None else f"{k['best_ms']:.4f}"
            lines.append(
                f"| `{k['name']}` | {k['calls']} | {k['trials_after']} | {hand} | {best} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    set_num_threads(threads)
    torch.set_num_threads(threads)
    shown = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/tune.py", *shown])
    results = []
    with tempfile.TemporaryDirectory(prefix="vitsparse-tune-db-") as fresh:
        db = Path(args.db) if args.db else Path(fresh)
        for model in args.models:
            result = _run(model, db, args)
            result["rounds"] = args.rounds
            results.append(result)
    date = time.strftime("%Y-%m-%d %H:%M:%S %z")
    host = host_info()
    suite = {"command": command, "date": date, "threads": threads, "host": host, "results": results}
    outdir = Path(args.outdir)
    write_text_atomic(outdir / f"{STEM}.json", json.dumps(suite, indent=2) + "\n")
    write_text_atomic(outdir / f"{STEM}.md", _markdown(results, command, date, threads, host))
    print(f"wrote {outdir / STEM}.json and .md", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"], metavar="NAME")
    p.add_argument("--trials", type=int, help="total budget per model (default: tune's default)")
    p.add_argument("--db", metavar="DIR", help="database root to continue (default: a fresh one)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    add_common_args(p, number=3)
    return p


if __name__ == "__main__":
    sys.exit(main())
