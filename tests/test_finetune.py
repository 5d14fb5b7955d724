"""Fine-tuning a pruned model: the plan holds (structure and masks), the checkpoint and the
re-issued plan compile equal to PyTorch, a killed run resumes to the same result, the data
sources, and bad input."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _compiled import assert_compiled_matches_torch

from vitsparse.cli import main
from vitsparse.data.digits import DIGITS_MODEL
from vitsparse.data.training import training_data
from vitsparse.errors import DataError, TrainingError
from vitsparse.frontend import load_torch_model
from vitsparse.frontend.loading import load_checkpoint
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.finetune import finetune
from vitsparse.plan import PruningPlan, validate_plan
from vitsparse.pruning import block_mask_plan, compose_plan, structure_plan


def _structural(model):
    structure = structure_plan(model, heads=0.5, mlp=0.5, embed=0.75, tokens="0.5@1")
    return compose_plan(
        model, model_id="tiny", method="magnitude", structure=structure, block_spec=((16, 16), 0.5)
    )


def _blocks(model):
    return block_mask_plan(model, model_id="tiny", block=(16, 16), keep=0.3)


@pytest.mark.parametrize(
    ("make_plan", "data"), [(_structural, "digits-train"), (_blocks, "synthetic")]
)
def test_the_plan_holds_and_the_result_compiles_equal_to_pytorch(tmp_path, make_plan, data):
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    plan = make_plan(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "ft"
    lines = []
    report = finetune(
        model, plan=plan, data=data, out=out, steps=8, batch_size=32, save_every=3,
        progress=lines.append,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["finetune.json", "model.pt", "plan.json"]
    assert report.total_steps == 8 and len(report.history) >= 2  # before, then each epoch
    assert ("data-free distillation" in "\n".join(lines)) == (data == "synthetic")
    assert json.loads((out / "finetune.json").read_text())["best_epoch"] == report.best_epoch

    reissued = PruningPlan.load(out / "plan.json")
    assert reissued.structure == plan.structure and dict(reissued.layers) == dict(plan.layers)
    assert reissued.weights_hash != plan.weights_hash
    tuned = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    load_checkpoint(tuned, out / "model.pt", model_id="tiny")
    validate_plan(reissued, tuned)  # the re-issued plan is for these weights
    state = tuned.state_dict()
    for name, mask in plan.layers.items():  # pruned blocks exactly zero in the checkpoint
        weight = state[f"{name}.weight"]
        if plan.structure is None:
            assert torch.count_nonzero(weight[~torch.from_numpy(mask.element_mask())]) == 0
    assert any(not torch.equal(state[k], before[k]) for k in state)  # it trained
    assert_compiled_matches_torch(tuned, reissued)


def test_structure_stays_removed_in_the_checkpoint(tmp_path):
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    structure = structure_plan(model, heads=0.5)
    plan = compose_plan(model, model_id="tiny", method="magnitude", structure=structure)
    before = model.state_dict()["blocks.0.attn.proj.weight"].clone()
    finetune(model, plan=plan, data="digits-train", out=tmp_path / "ft", steps=4, progress=None)
    state = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)
    kept = structure.block(0).heads.kept
    gone = [h for h in range(4) if h not in kept]
    proj = state["blocks.0.attn.proj.weight"].reshape(64, 4, 16)
    # A removed head's columns are the dense model's, untouched; a kept head's trained.
    assert torch.equal(proj[:, gone], before.reshape(64, 4, 16)[:, gone])
    assert not torch.equal(proj[:, list(kept)], before.reshape(64, 4, 16)[:, list(kept)])


def _digits_plan(path):
    model, model_id = load_torch_model(DIGITS_MODEL)
    block_mask_plan(model, model_id=model_id, block=(16, 16), keep=0.5).save(path)


FINETUNE = [sys.executable, "-m", "vitsparse.cli", "finetune", DIGITS_MODEL]


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    plan = tmp_path / "plan.json"
    _digits_plan(plan)
    args = ["--plan", str(plan), "--data", "digits-train", "--steps", "60", "--batch-size", "32"]
    args += ["--save-every", "5"]
    straight = subprocess.run([*FINETUNE, *args, "-o", str(tmp_path / "a")], capture_output=True)
    assert straight.returncode == 0, straight.stderr.decode()[-2000:]

    out = tmp_path / "b"
    proc = subprocess.Popen([*FINETUNE, *args, "-o", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    saves = set()  # each atomic save is a new file: wait for the second (a mid-training one)
    while len(saves) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline
        with contextlib.suppress(FileNotFoundError):
            saves.add(os.stat(out / "state.pt").st_ino)
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run, after a saved state
    proc.wait()
    assert not (out / "model.pt").exists()
    other = subprocess.run(
        [*FINETUNE, *args[:3], "synthetic", *args[4:], "-o", str(out), "--resume"],
        capture_output=True,
    )
    assert other.returncode == 2 and b"started with another data" in other.stderr
    resumed = subprocess.run([*FINETUNE, *args, "-o", str(out), "--resume"], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    step = re.search(r"resuming at step (\d+)/60", resumed.stderr.decode())
    assert step and 0 < int(step.group(1)) < 60
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "plan.json").read_text() == (out / "plan.json").read_text()
    assert not (out / "state.pt").exists()


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


def test_bad_input_is_an_error_and_writes_nothing(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    _digits_plan(plan)
    base = ["finetune", DIGITS_MODEL, "--plan", plan, "--data", "digits-train", "--steps", "2"]
    out = tmp_path / "out"

    tiny_plan = tmp_path / "tiny.json"
    _blocks(tiny_vit(depth=2, embed_dim=64, num_heads=4)).save(tiny_plan)
    other = torch.nn.Linear(3, 3).state_dict()
    torch.save(other, tmp_path / "other.pt")
    model, _ = load_torch_model(DIGITS_MODEL)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    torch.save(model.state_dict(), tmp_path / "perturbed.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    eleven = _image_folder(tmp_path / "eleven", classes=11, per_class=1)
    cases = [
        (["--plan", tiny_plan], "the plan's mask is for a weight of shape"),  # another model
        (["--checkpoint", tmp_path / "perturbed.pt"], "computed for other weights"),
        (["--data", tmp_path / "empty"], "image folder"),
        (["--teacher", tmp_path / "other.pt"], "does not match model"),
        (["--data", "nowhere/none"], "is not a directory"),
        (["--data", eleven], "has 11 classes; vitsparse/digits_vit predicts 10"),
    ]
    for extra, message in cases:
        code, err = _run(capsys, *base, *extra, "-o", out)
        assert code == 2 and message in err, (extra, err)
        assert "Traceback" not in err and not out.exists(), extra
    code, err = _run(capsys, *base, "-o", tmp_path / "a_file" / "out")
    assert code == 2 and "not writable" in err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "finetune",
                DIGITS_MODEL,
                "--plan",
                str(plan),
                "--data",
                "x",
                "--steps",
                "0",
                "-o",
                "o",
            ]
        )
    assert exit_info.value.code == 2 and "is not positive" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="steps must be a positive integer"):
        finetune(DIGITS_MODEL, plan=plan, data="digits-train", out=out, steps=-1, progress=None)
    with pytest.raises(TrainingError, match="unknown fine-tune option"):
        finetune(DIGITS_MODEL, plan=plan, data="digits-train", out=out, step=3, progress=None)
    out.mkdir()
    (out / "x").write_text("")
    code, err = _run(capsys, *base, "-o", out)
    assert code == 2 and "not an empty directory" in err and os.listdir(out) == ["x"]
    code, err = _run(capsys, *base, "-o", tmp_path / "done")
    assert code == 0, err
    code, err = _run(capsys, *base, "-o", tmp_path / "done", "--resume")
    assert code == 2 and "nothing to resume" in err and "has finished" in err


def test_prune_then_finetune_in_one_call(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    code = main(
        ["prune", DIGITS_MODEL, "--method", "magnitude", "--blocks", "16x16:0.5", "-o", str(plan)]
        + ["--finetune-steps", "3", "--data", "digits-train"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    finetuned = tmp_path / "plan-finetuned"
    assert {p.name for p in finetuned.iterdir()} == {"model.pt", "plan.json", "finetune.json"}
    assert (
        PruningPlan.load(plan).weights_hash
        != PruningPlan.load(finetuned / "plan.json").weights_hash
    )
    assert "fine-tuned on digits-train" in captured.out
    code = main(["prune", DIGITS_MODEL, "--method", "magnitude", "--blocks", "16x16:0.5"]
                + ["-o", str(tmp_path / "x.json"), "--finetune-steps", "3"])  # fmt: skip
    assert code == 2 and "need --data" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("")
    taken = ["--finetune-out", str(tmp_path / "taken")]
    code = main(["prune", DIGITS_MODEL, "--method", "magnitude", "--blocks", "16x16:0.5"]
                + ["-o", str(tmp_path / "y.json"), "--finetune-steps", "3"]
                + ["--data", "digits-train", *taken])  # fmt: skip
    assert code == 2 and "not an empty directory" in capsys.readouterr().err
    assert not (tmp_path / "y.json").exists()  # refused before pruning


def _image_folder(root, classes=2, per_class=5):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_image_folder_training_data_is_augmented_reproducibly(tmp_path):
    data = training_data(_image_folder(tmp_path / "images"), image_size=32, seed=3)
    assert data.labelled and not data.data_free
    assert data.size == 9 and len(data.held_out) == 1  # 10% of 10 held out
    order = data.order(epoch=0, seed=3)
    x, y = data.batch(0, 0, order[:4], seed=3)
    again, _ = data.batch(0, 0, order[:4], seed=3)
    other, _ = data.batch(0, 1, order[:4], seed=3)
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert torch.equal(data.order(epoch=0, seed=3), order)
    with pytest.raises(DataError, match="too few to train on"):
        training_data(_image_folder(tmp_path / "one", classes=1, per_class=1), image_size=32)
    with contextlib.redirect_stderr(io.StringIO()):
        digits = training_data("digits-train", image_size=32)
    assert digits.labelled and len(digits.held_out) + digits.size == 1438  # the train split
