"""What the benchmark scripts share: the output options, the "reproduce with" block, and writing
a suite of ``bench`` runs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def add_common_args(p: argparse.ArgumentParser, *, number: int) -> None:
    """--repeat, --number, --threads and --outdir, the same in every script."""
    p.add_argument("--repeat", type=int, default=10, help="timing samples (default 10)")
    p.add_argument("--number", type=int, default=number, help=f"runs per sample (default {number})")
    p.add_argument("--threads", type=int, help="default: os.cpu_count()")
    p.add_argument("--outdir", default=str(RESULTS), metavar="DIR")


def reproduce_block(command: str) -> list[str]:
    """Markdown lines giving the command that produced a page."""
    return ["- reproduce with:", "", "```", command, "```", ""]


def write_bench_runs(
    outdir: str | Path, stem: str, command: str, threads: int, runs: list[dict], markdown: Callable
) -> None:
    """Write ``runs`` (dicts whose ``"report"`` is a BenchReport) as ``<stem>.json`` and, through
    ``markdown(runs, command, date, threads, host)``, ``<stem>.md``, atomically."""
    from vitsparse._io import write_text_atomic
    from vitsparse.report import host_info

    date = time.strftime("%Y-%m-%d %H:%M:%S %z")
    host = host_info()
    suite = {
        "command": command,
        "date": date,
        "threads": threads,
        "host": host,
        "runs": [{k: (v.to_json() if k == "report" else v) for k, v in r.items()} for r in runs],
    }
    outdir = Path(outdir)
    write_text_atomic(outdir / f"{stem}.json", json.dumps(suite, indent=2) + "\n")
    write_text_atomic(outdir / f"{stem}.md", markdown(runs, command, date, threads, host))
    print(f"wrote {outdir / stem}.json and .md", file=sys.stderr)
