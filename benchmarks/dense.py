"""Dense baseline on this x86 machine: PyTorch eager, ONNX Runtime and TVM (no pruning).

Runs :func:`vitsparse.jobs.bench.bench` for each model and batch size and writes
``docs/results/dense_x86.json`` (every report) and ``docs/results/dense_x86.md`` (a summary
table, then one table per model and batch, with the host, thread count, date and the command
line that produced them). Both files are written only after every run succeeded.

    python benchmarks/dense.py                      # deit_tiny + deit_small, batch 1 and 8
    python benchmarks/dense.py --models deit_tiny_patch16_224 --batches 1 --repeat 5
    python benchmarks/dense.py --db tuning_db       # with tuned kernels from `vitsparse tune`
"""

from __future__ import annotations

import argparse
import sys

import _common
import numpy as np

from vitsparse.jobs.bench import bench
from vitsparse.jobs.bench_report import BenchReport
from vitsparse.jobs.compile import compile_model
from vitsparse.targets import host_info

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
BATCHES = (1, 8)
TARGET = "x86"
STEM = "dense_x86"


def main(argv: list[str] | None = None) -> int:
    args, threads, command = _common.start(_parser(), "dense.py", argv)
    reports: list[BenchReport] = []
    for model in args.models:
        for batch in args.batches:
            report = bench(
                model,
                target=TARGET,
                batch=batch,
                threads=threads,
                repeat=args.repeat,
                number=args.number,
                db=args.db,
                progress=_common.say,
            )
            print(report.table() + "\n", flush=True)
            reports.append(report)
    profiles = {}
    if args.profile:
        for model in args.models:
            _common.say(f"[profile] {model}, batch 1")
            profiles[model] = _profile(model, db=args.db)
    host, date = host_info(), _common.now()
    suite = {
        "format": "vitsparse-bench-suite/1",
        "command": command,
        "date": date,
        "threads": threads,
        "host": host,
        "reports": [r.to_json() for r in reports],
        "profiles": {m: [k.to_json() for k in rows] for m, rows in profiles.items()},
    }
    markdown = _markdown(reports, command, date, threads, host) + _profile_markdown(profiles)
    _common.write_suite(args.outdir, STEM, suite, markdown)
    return 0


def _markdown(reports: list[BenchReport], command: str, date: str, threads: int, host) -> str:
    lines = [
        "# Dense baseline on x86: PyTorch eager vs ONNX Runtime vs TVM",
        "",
        _common.host_line(
            host, f"{host['physical_cores']} physical cores, {host['logical_cpus']} logical CPUs"
        ),
        f"- threads per runtime: {threads}",
        f"- date: {date}",
        "- latency: median of `repeat` samples, each the mean of `number` runs, after warm-up;"
        " random weights, one seeded random input per model and batch",
        *_common.reproduce_block(command),
        "| model | batch | torch-eager ms | onnxruntime ms | tvm-dense ms | tvm / torch |",
        "| ----- | ----: | -------------: | -------------: | -----------: | ----------: |",
    ]
    for r in reports:
        ms = {row.runtime: row.median_ms for row in r.rows}
        torch_ms, tvm_ms = ms.get("torch-eager"), ms.get("tvm-dense")
        ratio = f"{tvm_ms / torch_ms:.2f}" if torch_ms and tvm_ms else "-"
        cells = [_ms(ms.get(name)) for name in ("torch-eager", "onnxruntime", "tvm-dense")]
        lines.append(f"| {r.model} | {r.batch} | {' | '.join(cells)} | {ratio} |")
    lines += [
        "",
        "`tvm / torch` is TVM's median latency over PyTorch's (below 1: TVM is faster).",
        "",
        "",
    ]
    return "\n".join(lines) + "\n".join(r.to_markdown() for r in reports)


def _profile(model: str, *, db: str | None, top: int = 12):
    compiled = compile_model(model, target=TARGET, db=db)
    x = np.random.default_rng(0).standard_normal(compiled.input_shape, dtype=np.float32)
    return compiled.profile(x)[:top]


def _profile_markdown(profiles) -> str:
    if not profiles:
        return ""
    lines = [
        "",
        "## Where the time goes (tvm-dense, batch 1)",
        "",
        "Per-kernel time from the Relax VM's instrumentation (it adds a few microseconds per call,",
        "so the column sums to a little more than the latency above); the top kernels only.",
        "",
    ]
    for model, rows in profiles.items():
        lines += [f"### {model}", "", "| kernel | ms / inference | calls |"]
        lines.append("| --- | ---: | ---: |")
        for r in rows:
            lines.append(f"| `{r.name}` | {r.ms_per_inference:.3f} | {r.calls_per_inference} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), metavar="B")
    p.add_argument("--db", metavar="DIR", help="tuning database root (`vitsparse tune`)")
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the per-kernel profile of each model at batch 1",
    )
    _common.add_common_args(p, number=5)
    return p


if __name__ == "__main__":
    sys.exit(main())
