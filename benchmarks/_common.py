"""What the benchmark scripts share: the output options and the "reproduce with" block."""

from __future__ import annotations

import argparse
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
