"""The vitsparse command line: real compiles and benches, and clean failures on bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from vitsparse.cli import main
from vitsparse.frontend.testing import tiny_vit
from vitsparse.targets import resolve_target

DEIT = "deit_tiny_patch16_224"
ARTIFACT_FILES = {"model.so", "manifest.json", "run.py"}


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitsparse.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _main(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny_vit.onnx"
    torch.onnx.export(
        tiny_vit(depth=2), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True, verbose=False
    )
    return path


# --- compile -------------------------------------------------------------------------------


def test_artifact_runs_on_the_tvm_runtime_alone(tmp_path):
    """The artifact's run.py loads and runs it where torch (and so vitsparse) cannot be
    imported and TVM loads its runtime library only; the output matches the compiled model's.
    One copy of the weights (in model.so) and the modes the umask gives."""
    import os
    import stat

    import numpy as np

    from vitsparse.jobs.compile import compile_model

    compiled = compile_model(tiny_vit(depth=2), target="x86")
    out = compiled.export(tmp_path / "artifact")
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o666 & ~umask
    x = np.random.default_rng(1).standard_normal(compiled.input_shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    blocked = tmp_path / "blocked"
    for name in ("torch", "timm", "vitsparse"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked), "TVM_USE_RUNTIME_LIB": "1"}
    env.pop("TVM_NUM_THREADS", None)
    run = subprocess.run(
        [sys.executable, str(out / "run.py"), str(out), "--input", str(tmp_path / "x.npy")]
        + ["--output", str(tmp_path / "y.npy"), "--time", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{len(os.sched_getaffinity(0))} threads)" in run.stdout  # every core, deliberately
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), compiled.run(x), rtol=0, atol=1e-5)
    np.save(tmp_path / "bad.npy", x[:, :, :16])
    bad = subprocess.run(
        [sys.executable, str(out / "run.py"), str(out), "--input", str(tmp_path / "bad.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and "this artifact takes (1, 3, 32, 32)" in bad.stderr


def test_compile_writes_artifact(capsys, tmp_path, tiny_onnx):
    out = tmp_path / "artifact"
    code, stdout, stderr = _main(capsys, "compile", tiny_onnx, "--target", "x86", "-o", out)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "tiny_vit" and manifest["weights_seed"] is None  # ONNX
    assert manifest["input_shape"] == [1, 3, 32, 32]
    assert manifest["target"]["name"] == "x86"
    assert {"tvm", "torch", "vitsparse"} <= set(manifest["versions"])
    key = resolve_target("x86").key
    assert f"target    x86 -> {key}" in stdout
    assert "tiny_vit: 2 blocks, embed 64, 4 heads" in stdout
    assert f"artifact  {out}" in stdout and "model.so" in stdout
    # a second compile replaces the artifact in place
    assert _main(capsys, "compile", tiny_onnx, "-o", out)[0] == 0
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert {p.name for p in tmp_path.iterdir()} == {"artifact"}


def test_compile_timm_name_with_checkpoint(capsys, tmp_path):
    checkpoint = tmp_path / "deit.pt"
    model = timm.create_model(DEIT)
    torch.save({"model": model.state_dict()}, checkpoint)
    out = tmp_path / "deit"
    code, stdout, stderr = _main(capsys, "compile", DEIT, "--checkpoint", checkpoint, "-o", out)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == DEIT and manifest["input_shape"] == [1, 3, 224, 224]
    assert manifest["weights_seed"] is None  # the checkpoint's weights, not a seed's
    assert f"{DEIT}: 12 blocks, embed 192, 3 heads" in stdout


def test_compile_dump_ir(capsys, tmp_path, tiny_onnx):
    dump = tmp_path / "ir"
    code, _, stderr = _main(capsys, "compile", tiny_onnx, "--dump-ir", dump, "-o", tmp_path / "a")
    assert code == 0, stderr
    assert any(dump.iterdir())


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("file") is None,
    reason="needs aarch64-linux-gnu-g++ (apt g++-aarch64-linux-gnu) and file",
)
def test_compile_for_arm(capsys, tmp_path, tiny_onnx):
    out = tmp_path / "arm"
    code, stdout, stderr = _main(capsys, "compile", tiny_onnx, "--target", "arm", "-o", out)
    assert code == 0, stderr
    kind = subprocess.run(["file", out / "model.so"], capture_output=True, text=True).stdout
    assert "aarch64" in kind
    assert "this machine cannot run the artifact" in stdout
    assert json.loads((out / "manifest.json").read_text())["target"]["key"] == "arm-aarch64-neon"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit)")
def test_compile_for_cuda(capsys, tmp_path, tiny_onnx):
    out = tmp_path / "cuda"
    args = ("compile", tiny_onnx, "--target", "cuda", "--cuda-arch", "sm_80", "-o", out)
    code, stdout, stderr = _main(capsys, *args)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert (out / "model.so").stat().st_size > 0
    assert "cuda -> cuda-sm_80" in stdout


# --- bench, demo, targets ------------------------------------------------------------------


def test_bench_writes_json_and_markdown(tmp_path):
    report_json, report_md = tmp_path / "out" / "bench.json", tmp_path / "bench.md"
    args = ("bench", DEIT, "--repeat", "2", "--number", "1", "--threads", "2")
    proc = _run_cli(*args, "--json", str(report_json), "--markdown", str(report_md))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report_json.read_text())
    assert [r["runtime"] for r in data["rows"]] == ["torch-eager", "onnxruntime", "tvm-dense"]
    assert all(r["status"] == "ok" and r["repeats"] == 2 for r in data["rows"])
    assert all(r["max_abs_err_vs_torch"] < 1e-3 for r in data["rows"])
    assert data["model"] == DEIT and data["input_shape"] == [1, 3, 224, 224]
    assert data["threads"] == 2
    assert "tvm-dense vs torch-eager" in data["speedup"]
    for runtime in ("torch-eager", "onnxruntime", "tvm-dense"):
        assert runtime in proc.stdout and f"| {runtime} |" in report_md.read_text()
    assert "[bench] compiling deit_tiny_patch16_224 for x86" in proc.stderr
    assert sorted(p.name for p in report_json.parent.iterdir()) == ["bench.json"]


@pytest.fixture(scope="module")
def deit_plan(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint of one deit_tiny, a plan made by `vitsparse prune` for those weights)."""
    root = tmp_path_factory.mktemp("pruned")
    checkpoint, plan = root / "deit.pt", root / "plan.json"
    torch.save({"model": timm.create_model(DEIT).state_dict()}, checkpoint)
    args = ("prune", DEIT, "--method", "magnitude", "--blocks", "32x32:0.5")
    assert main([*args, "--checkpoint", str(checkpoint), "-o", str(plan)]) == 0
    return checkpoint, plan


def test_bench_with_a_plan(capsys, tmp_path, deit_plan):
    checkpoint, plan = deit_plan
    report_json = tmp_path / "bench.json"
    args = ("bench", DEIT, "--checkpoint", checkpoint, "--plan", plan, "--json", report_json)
    timing = ("--runtimes", "torch-pruned,tvm-pruned", "--repeat", "1", "--number", "1")
    code, stdout, stderr = _main(capsys, *args, *timing, "--threads", "2")
    assert code == 0, stderr
    rows = {r["runtime"]: r for r in json.loads(report_json.read_text())["rows"]}
    assert list(rows) == ["torch-pruned", "tvm-pruned"]
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["tvm-pruned"]["max_abs_err_vs_torch"] <= 1e-4
    assert "layers BSR" in rows["tvm-pruned"]["detail"]
    assert "measured against torch-pruned's output" in stdout


def test_compile_with_a_plan(capsys, tmp_path, deit_plan):
    checkpoint, plan = deit_plan
    out = tmp_path / "pruned"
    args = ("compile", DEIT, "--checkpoint", checkpoint, "--plan", plan, "-o", out)
    code, stdout, stderr = _main(capsys, *args)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert "(magnitude, mean density 0.500)" in stdout
    found = re.search(r"sparsity  (\d+) layers BSR, (\d+) dense \(break-even measured\)", stdout)
    assert found and int(found[1]) + int(found[2]) == 48, stdout  # qkv/proj/fc1/fc2 x 12 blocks


def test_bench_plan_for_other_weights_writes_no_json(capsys, tmp_path, deit_plan):
    _, plan = deit_plan  # made for the checkpoint; timm's random weights differ
    report = tmp_path / "r.json"
    code, _, stderr = _main(capsys, "bench", DEIT, "--plan", plan, "--json", report)
    assert code == 2
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("vitsparse: error: ") and ("hash" in error or "weights" in error)
    assert "[bench] timing" not in stderr and "Traceback" not in stderr
    assert not report.exists()


def test_bench_pruned_runtime_needs_a_plan(capsys):
    code, _, stderr = _main(capsys, "bench", DEIT, "--runtimes", "tvm-pruned")
    assert code == 2 and "need a pruning plan: add --plan" in stderr


def test_demo_prints_the_comparison(capsys):
    code, stdout, stderr = _main(capsys, "demo", "--repeat", "1", "--number", "1")
    assert code == 0, stderr
    assert stdout.startswith(f"{DEIT} (seed-0 random weights), batch 1")
    for runtime in ("torch-eager", "onnxruntime", "tvm-dense"):
        assert runtime in stdout
    assert "tvm-dense vs torch-eager" in stdout


def test_targets_lists_every_preset(capsys):
    code, stdout, _ = _main(capsys, "targets")
    assert code == 0
    for name in ("x86", "arm", "cuda"):
        assert f"{name}: " in stdout
    assert resolve_target("x86").key in stdout and "arm-aarch64-neon" in stdout
    assert '"mtriple": "aarch64-linux-gnu"' in stdout


# --- bad input -----------------------------------------------------------------------------


def _corrupt_database(root: Path) -> Path:
    directory = root / resolve_target("x86").key
    directory.mkdir(parents=True)
    (directory / "database_workload.json").write_text("{ this is not json\n")
    (directory / "database_tuning_record.json").write_text("garbage\n")
    return root


BAD_COMPILES = {
    "unknown model": (lambda tmp, onnx: ["deit_tinyy"], "unknown timm model 'deit_tinyy'"),
    "not a ViT": (lambda tmp, onnx: ["resnet18"], "resnet18"),
    "bad target": (lambda tmp, onnx: [onnx, "--target", "x87"], "unknown target preset 'x87'"),
    "missing checkpoint": (
        lambda tmp, onnx: [DEIT, "--checkpoint", tmp / "missing.pt"],
        "missing.pt",
    ),
    "missing onnx": (lambda tmp, onnx: [tmp / "missing.onnx"], "missing.onnx"),
    "not an onnx file": (
        lambda tmp, onnx: [Path(__file__)],
        "only .onnx files can be given as MODEL",
    ),
    "corrupt database": (
        lambda tmp, onnx: [onnx, "--db", _corrupt_database(tmp / "db")],
        "database",
    ),
}


@pytest.mark.parametrize(
    "case",
    list(BAD_COMPILES),
)
def test_bad_input_exits_with_a_message_and_writes_nothing(capsys, tmp_path, tiny_onnx, case):
    make_args, expected = BAD_COMPILES[case]
    out = tmp_path / "out"
    code, stdout, stderr = _main(capsys, "compile", *make_args(tmp_path, tiny_onnx), "-o", out)
    assert code == 2
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("vitsparse: error: ")
    assert expected.lower() in error.lower()
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_input_through_the_console_script(tmp_path):
    out = tmp_path / "out"
    proc = _run_cli("compile", "deit_tinyy", "-o", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "[compile] compiling deit_tinyy for x86 ..."
    assert lines[1].startswith("vitsparse: error: unknown timm model 'deit_tinyy'; did you mean")
    assert "deit_tiny_patch16_224" in lines[1] and len(lines) == 2
    assert not out.exists()


def test_bench_bad_target_writes_no_json(capsys, tmp_path):
    report = tmp_path / "r.json"
    code, _, stderr = _main(capsys, "bench", DEIT, "--target", "x87", "--json", report)
    assert code == 2 and "unknown target preset 'x87'" in stderr
    assert not report.exists()


def test_tune_bad_target(capsys, tmp_path):
    code, _, stderr = _main(capsys, "tune", DEIT, "--target", "x87", "--db", tmp_path / "db")
    assert code == 2 and "x87" in stderr
    assert not (tmp_path / "db").exists()


def test_tune_missing_plan_fails_before_tuning(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    code, _, stderr = _main(capsys, "tune", DEIT, "--plan", missing, "--db", tmp_path / "db")
    assert code == 2 and "nope.json" in stderr
    assert not (tmp_path / "db").exists()


def test_compile_refuses_to_replace_a_foreign_directory(capsys, tmp_path, tiny_onnx):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, stderr = _main(capsys, "compile", tiny_onnx, "-o", out)
    assert code == 2 and "refusing to replace it" in stderr
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "argv",
    [
        ["compile", DEIT],  # no -o
        ["bench", DEIT, "--batch", "0"],
        ["bench", DEIT, "--runtimes", "torch-eager,tvm-sparse"],
        ["bench", DEIT, "--json", "."],
        ["frobnicate"],
        [],
    ],
)
def test_argument_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: vitsparse" in capsys.readouterr().err
