"""`vitsparse prune`: writes a plan that loads back and fits the model; bad input exits 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

from vitsparse.cli import main
from vitsparse.frontend import load_torch_model
from vitsparse.jobs.prune import prune
from vitsparse.plan import PruningPlan, validate_plan

DEIT = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """deit_tiny's (random) weights, so that the CLI and the test see the same model."""
    path = tmp_path_factory.mktemp("ckpt") / "deit_tiny.pth"
    torch.save(timm.create_model(DEIT).state_dict(), path)
    return path


def _main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_a_plan_that_fits(capsys, tmp_path, checkpoint):
    out = tmp_path / "plans" / "deit.json"
    code, stdout, stderr = _main(
        capsys,
        *("prune", DEIT, "--method", "magnitude", "--blocks", "32x32:0.5"),
        *("--checkpoint", checkpoint, "-o", out),
    )
    assert code == 0, stderr
    plan = PruningPlan.load(out)
    assert plan.model_id == DEIT and plan.method == "magnitude"
    assert len(plan.layers) == 48 and plan.mean_density == 0.5
    model, _ = load_torch_model(DEIT, checkpoint=checkpoint)
    validate_plan(plan, model)  # the hash is that of the checkpoint's weights
    assert plan == prune(DEIT, method="magnitude", blocks="32x32:0.5", checkpoint=checkpoint)
    lines = dict(line.split(maxsplit=1) for line in stdout.splitlines())
    assert lines["layers"].startswith("48 linear layers")
    assert lines["blocks"] == "32x32, keep 0.5"
    assert lines["density"] == "mean 0.500 (min 0.500, max 0.500)"
    assert lines["flops"] == "50.0% of the masked layers' multiply-adds kept"
    assert lines["plan"] == str(out)
    assert "note" not in lines


def test_prune_random_on_selected_layers(capsys, tmp_path, checkpoint):
    out = tmp_path / "plan.json"
    args = ["prune", DEIT, "--method", "random", "--blocks", "16x64:0.25", "--seed", "3"]
    args += ["--layers", "blocks.0.*", "--layers", "blocks.11.mlp.*", "--checkpoint", checkpoint]
    code, stdout, stderr = _main(capsys, *args, "-o", out)
    assert code == 0, stderr
    plan = PruningPlan.load(out)
    assert list(plan.layers) == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.11.mlp.fc1",
        "blocks.11.mlp.fc2",
    ]
    assert plan.budget == {
        "blocks": "16x64",
        "keep": 0.25,
        "layers": ["blocks.0.*", "blocks.11.mlp.*"],
        "seed": 3,
    }
    assert all(m.block == (16, 64) and m.density == 0.25 for m in plan.layers.values())
    assert "6 linear layers (blocks.0.*, blocks.11.mlp.*)" in stdout


def test_a_plan_of_random_weights_applies_in_another_process(capsys, tmp_path):
    """timm's random weights come from a fixed seed: a plan pruned here (it carries the weights'
    hash) is accepted by a command run in another process."""
    import subprocess
    import sys

    out = tmp_path / "plan.json"
    code, stdout, stderr = _main(
        capsys, "prune", DEIT, "--method", "magnitude", "--blocks", "64x64:0.5", "-o", out
    )
    assert code == 0, stderr
    assert PruningPlan.load(out).layers["blocks.0.attn.qkv"].kept.shape == (9, 3)
    cmd = [sys.executable, "-m", "vitsparse.cli", "eval", DEIT, "--data", "synthetic"]
    other = subprocess.run(
        [*cmd, "--limit", "2", "--plan", str(out)], capture_output=True, text=True, timeout=300
    )
    assert other.returncode == 0, other.stderr[-2000:]
    assert "fidelity  top-1 agreement" in other.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks", "32x32"], "block spec '32x32' is not ROWSxCOLS:KEEP"),
        (["--blocks", "24x24:0.5"], "layer 'blocks.0.attn.qkv': block 24x24 is not handled"),
        (["--blocks", "32x32:1.5"], r"keep must be a fraction in \(0, 1\], got 1.5"),
        (
            ["--blocks", "32x32:0.5", "--layers", "blocks.0.*", "nope*"],
            "layer pattern 'nope\\*' matches no linear layer",
        ),
        (["--blocks", "32x32:0.5", "--seed", "-1"], "seed must be a non-negative integer"),
        (
            ["--blocks", "32x32:0.5", "--checkpoint", "missing.pth"],
            "checkpoint file 'missing.pth' .* does not exist",
        ),
        ([], "nothing to prune: give blocks, heads, mlp, embed and/or tokens"),
        (["--heads", "0"], r"heads must be a kept fraction in \(0, 1\], got 0.0"),
        (["--tokens", "0.7@4,13"], r"blocks must be distinct numbers in 1..12"),
        (["--tokens", "0.7:4"], "token spec '0.7:4' is not KEEP@BLOCKS"),
        (["--mlp", "0.3", "--blocks", "32x32:0.5"], "block 32x32 does not divide"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, args, message):
    out = tmp_path / "plan.json"
    code, stdout, stderr = _main(capsys, "prune", DEIT, "--method", "magnitude", *args, "-o", out)
    assert code == 2
    assert stderr.startswith("vitsparse: error: ")
    assert re.search(message, stderr), stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_model_exits_2(capsys, tmp_path):
    code, _, stderr = _main(
        capsys,
        "prune",
        "deit_tinyy",
        "--method",
        "random",
        "--blocks",
        "8x8:0.5",
        "-o",
        tmp_path / "p.json",
    )
    assert code == 2 and "unknown timm model 'deit_tinyy'" in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "taylor", "--blocks", "32x32:0.5"], "unknown method 'taylor'; known: "),
        (["--blocks", "32x32:0.5"], "the following arguments are required: --method"),
    ],
)
def test_argparse_errors(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", DEIT, *args, "-o", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_a_file(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["prune", DEIT, "--method", "random", "--blocks", "8x8:0.5", "-o", str(tmp_path)])
    assert "is a directory, not a file name" in capsys.readouterr().err


def test_prune_structure_and_blocks_in_one_plan(capsys, tmp_path, checkpoint):
    out = tmp_path / "plan.json"
    code, stdout, stderr = _main(
        capsys,
        *("prune", DEIT, "--method", "magnitude", "--heads", "0.5", "--mlp", "0.5"),
        *("--embed", "0.75", "--tokens", "0.7@4,7,10", "--blocks", "16x16:0.5"),
        *("--checkpoint", checkpoint, "-o", out),
    )
    assert code == 0, stderr
    plan = PruningPlan.load(out)
    assert plan.version == 2 and len(plan.layers) == 48
    structure = plan.structure
    assert len(structure.embed.kept) == 144
    assert [len(structure.block(i).heads.kept) for i in range(12)] == [2] * 12
    assert [len(structure.block(i).mlp.kept) for i in range(12)] == [384] * 12
    assert structure.token_schedule(196, 12) == [196] * 4 + [137] * 3 + [96] * 3 + [67] * 3
    qkv = plan.layers["blocks.0.attn.qkv"]
    assert qkv.weight_shape == (2 * 3 * 64, 144)  # the mask is on the sliced weight
    model, _ = load_torch_model(DEIT, checkpoint=checkpoint)
    validate_plan(plan, model)
    lines = dict(line.split(maxsplit=1) for line in stdout.splitlines())
    assert lines["heads"] == "kept per block: " + ", ".join(["2"] * 12)
    assert lines["tokens"].startswith("patch tokens kept: 137 after block 4, 96 after block 7")
