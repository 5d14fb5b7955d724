"""The README's examples (its "Use" block), as a newcomer types them.

Every command parses as the command line takes it (a renamed flag fails here). The commands that
run on this machine run as written, in order, each in its own process, in a folder holding the
files they name (``weights.pth``: deit_tiny's seeded weights; ``model.onnx``: a small ViT): the
quick ones in the default run, the long ones (deit_small, tuning, fine-tuning, the search, the
profile, CUDA) in the slow set. Commands that need a board behind a tracker (``HOST``) or run
until stopped (the RPC tracker and server) are only parsed. Optional ``[...]`` parts are left
out, as a newcomer's first try would.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitsparse.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"

# The commands of the default run: seconds each. (The dense deit_tiny compile and the int8 one
# run in the slow set: tests/test_cli.py and tests/test_precision.py compile both in-process.)
QUICK = (
    "vitsparse compile model.onnx",
    "vitsparse prune model.onnx",
    "vitsparse bench model.onnx",
    "vitsparse prune deit_tiny_patch16_224 --checkpoint weights.pth --method magnitude",
    "vitsparse compile deit_tiny_patch16_224 --checkpoint weights.pth --plan plan.json",
    "vitsparse prune deit_small_patch16_224 --method magnitude --heads",
    "vitsparse prune vitsparse/digits_vit --method nvit --budget flops=0.5 --calib digits-train "
    "-o plan.json",
    "vitsparse eval",
    "vitsparse targets",
)


def readme_commands() -> list[str]:
    """The commands of the README's "Use" block: continuation lines joined, comments and
    optional ``[...]`` parts dropped, ``A / B`` alternatives split."""
    block = README.read_text().split("## Use", 1)[1].split("```", 2)[1]
    commands, current = [], ""
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        code = re.split(r"\s#\s", line, maxsplit=1)[0].rstrip()
        current += " " + code.rstrip("\\").strip()
        if not code.endswith("\\"):
            commands.append(current.strip())
            current = ""
    out = []
    for command in commands:
        command = re.sub(r"\s*\[[^\]]*\]", "", command)
        out += [c.strip() for c in re.split(r"\s/\s(?=vitsparse )", command)]
    return out


def _kind(command: str) -> str:
    if "HOST" in command or command.startswith("vitsparse rpc"):
        return "parse"
    if "--target cuda" in command and shutil.which("nvcc") is None:
        return "parse"
    quick = command.startswith(QUICK) and "--finetune-steps" not in command
    return "quick" if quick else "slow"


COMMANDS = readme_commands()


def test_the_readme_block_was_read():
    assert len(COMMANDS) >= 25
    assert all(c.startswith("vitsparse ") for c in COMMANDS)
    assert {_kind(c) for c in COMMANDS} == {"parse", "quick", "slow"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    build_parser().parse_args(shlex.split(command)[1:])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder with the files the README's commands name."""
    import timm

    from vitsparse.frontend import load_torch_model
    from vitsparse.frontend.testing import tiny_vit

    root = tmp_path_factory.mktemp("readme")
    model, _ = load_torch_model("deit_tiny_patch16_224")
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    torch.save(model.state_dict(), root / "weights.pth")
    torch.onnx.export(tiny_vit(depth=2), (torch.zeros(1, 3, 32, 32),), str(root / "model.onnx"))
    return root


def _run_in(folder: Path, commands: list[str], timeout: float) -> None:
    for command in commands:
        argv = shlex.split(command)
        run = subprocess.run(
            [sys.executable, "-m", "vitsparse.cli", *argv[1:]],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"


def test_the_quick_readme_commands_run_as_written(folder):
    _run_in(folder, [c for c in COMMANDS if _kind(c) == "quick"], timeout=300)
    assert (folder / "out" / "deit_tiny_pruned" / "model.so").exists()


@pytest.mark.slow
def test_every_readme_command_runs_as_written(folder):
    _run_in(folder, [c for c in COMMANDS if _kind(c) != "parse"], timeout=3600)
    assert (folder / "out" / "mine" / "manifest.json").exists()  # the dense compile
