"""The ``vitsparse`` command line: a thin layer over the jobs, one module per command.

Each command module adds its parser (``add_parser``) and runs one job call around which it
parses and prints (``run``). A command imports its job when it runs: the jobs import TVM, which
takes seconds, and ``--help`` or a mistyped argument should answer at once. Errors in the user's
input (VitsparseError, missing files) print
``vitsparse: error: <message>`` and exit with status 2, as argparse does for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vitsparse._versions import VERSION
from vitsparse.cli import bench, demo, finetune, profile, prune, rpc, search, targets, tune
from vitsparse.cli import compile as compile_command
from vitsparse.cli import eval as eval_command
from vitsparse.cli._common import EXIT_USAGE, message
from vitsparse.errors import VitsparseError

# In the order `vitsparse --help` lists them.
COMMANDS = (
    compile_command,
    bench,
    tune,
    profile,
    rpc,
    eval_command,
    prune,
    finetune,
    search,
    demo,
    targets,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (VitsparseError, OSError) as err:
        print(f"vitsparse: error: {message(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vitsparse: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (each subparser sets ``run``)."""
    parser = argparse.ArgumentParser(
        prog="vitsparse",
        description="Compile Vision Transformers with Apache TVM and compare them with PyTorch "
        "and ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"vitsparse {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser
