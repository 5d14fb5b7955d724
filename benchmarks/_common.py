"""What the benchmark scripts share: the output options, the command line that reproduces a page,
the one timing loop (`alternate`: the runtimes or kernels compared take turns, round after round,
so a slow spell of the shared machine hits them alike), and writing a suite atomically."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vitsparse._io import write_text_atomic
from vitsparse.devices import available_cores
from vitsparse.jobs.bench import bench
from vitsparse.targets import host_info

PRUNED_ROWS = ("torch-eager", "torch-pruned", "tvm-dense", "tvm-pruned")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def add_common_args(p: argparse.ArgumentParser, *, number: int) -> None:
    """--repeat, --number, --threads and --outdir, the same in every script."""
    p.add_argument("--repeat", type=int, default=10, help="timing samples (default 10)")
    p.add_argument("--number", type=int, default=number, help=f"runs per sample (default {number})")
    add_output_args(p)


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--threads and --outdir."""
    p.add_argument("--threads", type=int, help="default: every core this process may use")
    p.add_argument("--outdir", default=str(RESULTS), metavar="DIR")


def start(
    parser: argparse.ArgumentParser, script: str, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, int, str]:
    """A script's parsed arguments, its thread count (`threads_of`) and the command line that
    reproduces the run (`command_line`)."""
    args = parser.parse_args(argv)
    return args, threads_of(args), command_line(script, argv)


def threads_of(args: argparse.Namespace) -> int:
    """``--threads`` (where the script has it), else every core this process may use."""
    return getattr(args, "threads", None) or available_cores()


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run of ``benchmarks/<script>``."""
    shown = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"benchmarks/{script}", *shown])


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def host_line(host: dict, rest: str) -> str:
    """The markdown line naming the host (CPU model, LLVM name, SIMD level), then ``rest``."""
    return f"- host: {host['cpu_model']} (LLVM `{host['llvm_cpu']}`, {host['simd']}), {rest}"


def pruned_page_head(title: str, host: dict, threads: int, date: str) -> list[str]:
    """The first lines of a page of `bench_plan` runs: the title and the setup."""
    setup = f"{threads} threads per runtime; date {date}; batch 1; random model weights"
    return [f"# {title}", "", host_line(host, setup)]


def reproduce_block(command: str) -> list[str]:
    """Markdown lines giving the command that produced a page."""
    return ["- reproduce with:", "", "```", command, "```", ""]


def alternate(timers: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """The benchmarks' one timing loop: ``rounds`` rounds in which every timer (a function that
    measures once and returns milliseconds) runs once, in order; the samples of each name."""
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(float(timer()))
    return samples


def bench_plan(model, plan, args: argparse.Namespace, threads: int):
    """`vitsparse.jobs.bench.bench` of ``model`` dense and pruned by ``plan`` (PyTorch and TVM,
    side by side) with the script's timing options; prints the table, returns the report."""
    report = bench(
        model,
        target="x86",
        threads=threads,
        repeat=args.repeat,
        number=args.number,
        plan=plan,
        include=PRUNED_ROWS,
        progress=say,
    )
    print(report.table() + "\n", flush=True)
    return report


def write_suite(outdir: str | Path, stem: str, suite: dict, markdown: str) -> None:
    """``<stem>.json`` (the suite) and ``<stem>.md`` (its page) in ``outdir``, atomically."""
    outdir = Path(outdir)
    write_text_atomic(outdir / f"{stem}.json", json.dumps(suite, indent=2) + "\n")
    write_text_atomic(outdir / f"{stem}.md", markdown)
    say(f"wrote {outdir / stem}.json and .md")


def write_bench_runs(
    outdir: str | Path, stem: str, command: str, threads: int, runs: list[dict], markdown: Callable
) -> None:
    """Write ``runs`` (dicts whose ``"report"`` is a BenchReport) as ``<stem>.json`` and, through
    ``markdown(runs, command, date, threads, host)``, ``<stem>.md``, atomically."""
    date, host = now(), host_info()
    suite = {
        "command": command,
        "date": date,
        "threads": threads,
        "host": host,
        "runs": [{k: (v.to_json() if k == "report" else v) for k, v in r.items()} for r in runs],
    }
    write_suite(outdir, stem, suite, markdown(runs, command, date, threads, host))
