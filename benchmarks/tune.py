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
import sys
import tempfile
from pathlib import Path

import _common
import numpy as np
import torch

from vitsparse.devices import Timing, set_num_threads, time_call
from vitsparse.frontend import import_model
from vitsparse.jobs.compile import compile_imported
from vitsparse.jobs.tune import tune
from vitsparse.targets import host_info

TARGET = "x86"
STEM = "tune_x86"


def _run(model_name: str, db: Path, args) -> dict:
    report = tune(model_name, target=TARGET, db=db, trials=args.trials, progress=_common.say)
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
    # The three take turns, so that machine noise hits them alike; median of the rounds.
    timing = Timing(repeat=args.repeat, number=args.number)
    xt = torch.from_numpy(x)

    def torch_ms() -> float:
        with torch.inference_mode():
            return time_call(lambda: imported.torch_model(xt), timing).median_ms

    rounds = _common.alternate(
        {
            "torch-eager": torch_ms,
            "tvm-hand": lambda: hand.time(x, repeat=args.repeat, number=args.number).median_ms,
            "tvm-tuned": lambda: tuned.time(x, repeat=args.repeat, number=args.number).median_ms,
        },
        args.rounds,
    )
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
        _common.host_line(host, f"{threads} threads; date {date}"),
        "- tvm-hand: hand-written schedules only; tvm-tuned: with the tuning database (each "
        "kernel's best record, the hand schedule included as a record)",
        f"- latency: median over {results[0]['rounds']} interleaved rounds (torch, hand, tuned), "
        "each round the median of `repeat` samples of `number` runs; batch 1",
        *_common.reproduce_block(command),
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
    args, threads, command = _common.start(_parser(), "tune.py", argv)
    set_num_threads(threads)
    torch.set_num_threads(threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="vitsparse-tune-db-") as fresh:
        db = Path(args.db) if args.db else Path(fresh)
        for model in args.models:
            result = _run(model, db, args)
            result["rounds"] = args.rounds
            results.append(result)
    date, host = _common.now(), host_info()
    suite = {"command": command, "date": date, "threads": threads, "host": host, "results": results}
    _common.write_suite(args.outdir, STEM, suite, _markdown(results, command, date, threads, host))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"], metavar="NAME")
    p.add_argument("--trials", type=int, help="total budget per model (default: tune's default)")
    p.add_argument("--db", metavar="DIR", help="database root to continue (default: a fresh one)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    _common.add_common_args(p, number=3)
    return p


if __name__ == "__main__":
    sys.exit(main())
