"""The emulated ARM device: an aarch64 TVM runtime under qemu-user, registered with a real tracker
on 127.0.0.1 as "arm-qemu". deit_tiny compiled for aarch64+NEON, dense and block-sparse, runs
there through RPC and matches PyTorch; int8 on the dot product (``arm82``) and fp16 on the
widening multiply-add (``arm84``) match their references; latency is reported as emulated.

Skipped, with the reason, where scripts/setup_arm_qemu.sh could not build the device (`make
install` runs it)."""

import numpy as np
import pytest
import torch
from _compiled import (
    assert_int8_exact_but_for_ties,
    assert_within_reference_noise,
    mlp_blocks_plan,
)

from vitsparse.cli import main
from vitsparse.data.sources import load_images
from vitsparse.devices import Timing, measure
from vitsparse.devices.qemu import ARM_QEMU_KEY, arm_python, start_arm_server
from vitsparse.devices.rpc import RpcDevice, start_tracker
from vitsparse.errors import TargetError
from vitsparse.frontend import load_torch_model
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.bench import bench
from vitsparse.jobs.compile import compile_model
from vitsparse.plan import apply_plan_to_torch
from vitsparse.pruning.block_mask import block_mask_plan


@pytest.fixture(scope="module")
def arm_device():
    try:
        arm_python()
    except TargetError as err:
        pytest.skip(str(err))
    tracker = start_tracker("127.0.0.1", 9392)
    address = f"127.0.0.1:{tracker.port}"
    try:
        server = start_arm_server(address, port=9492)
    except TargetError:
        tracker.terminate()
        raise
    yield RpcDevice(address, ARM_QEMU_KEY)
    server.terminate()
    tracker.terminate()


@pytest.fixture(scope="module")
def deit():
    return load_torch_model("deit_tiny_patch16_224")


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "bsr"])
def test_deit_tiny_runs_on_the_emulated_arm_device(arm_device, deit, pruned):
    model, model_id = deit
    plan = None
    if pruned:
        plan = block_mask_plan(model, model_id=model_id, block=(32, 32), keep=0.5)
    compiled = compile_model(model, target="arm", plan=plan)
    assert "+neon" in [str(a) for a in compiled.spec.target.attrs["mattr"]]
    if pruned:  # no break-even is measured for a remote target: every masked layer is BSR
        assert {d["kernel"] for d in compiled.sparsity_decisions} == {"bsr"}
        assert len(compiled.sparsity_decisions) == 48
    x = np.random.default_rng(3).standard_normal(compiled.input_shape, dtype=np.float32)
    timing = Timing(repeat=1, number=1, warmup=0)
    result = measure(compiled.executable, compiled.spec, [x], rpc=arm_device, timing=timing)
    with torch.no_grad():
        expect = (apply_plan_to_torch(model, plan) if pruned else model)(torch.from_numpy(x))
    np.testing.assert_allclose(result.output, expect.numpy(), rtol=0, atol=1e-4)
    assert result.device == "rpc:arm-qemu (emulated)"
    assert "aarch64 under qemu-user emulation" in result.emulated
    assert len(result.seconds) == 1 and result.seconds[0] > 0


def _run_on(arm_device, compiled, images):
    timing = Timing(repeat=1, number=1, warmup=0)
    result = measure(compiled.executable, compiled.spec, [images], rpc=arm_device, timing=timing)
    assert result.device == "rpc:arm-qemu (emulated)"
    return result.output


def test_int8_on_sdot_runs_on_the_emulated_device_and_matches_its_reference(arm_device):
    """--precision int8 --target arm82: the digits ViT calibrated, its linear layers int8 `sdot`
    kernels, dense and BSR, run on the emulated device and held to the PyTorch fake-quant
    model."""
    model, model_id = load_torch_model("vitsparse/digits_vit")
    plan = mlp_blocks_plan(model, model_id)
    compiled = compile_model(
        model_id, target="arm82", batch=4, plan=plan, precision="int8", calib="digits"
    )
    assert compiled.spec.key == "arm-aarch64-v82-dotprod-int8"
    decisions = {(d["kernel"], d.get("precision")) for d in compiled.sparsity_decisions}
    depth = len(model.blocks)
    assert decisions == {("bsr", "int8")} and len(compiled.sparsity_decisions) == 2 * depth
    assert len(compiled.quantization.scales) == 4 * depth  # the dense qkv and proj are int8 too
    x = load_images("digits", image_size=compiled.input_shape[-1], limit=4).images
    output = _run_on(arm_device, compiled, x.numpy())
    base = apply_plan_to_torch(model, plan)
    assert_int8_exact_but_for_ties(output, base, compiled.quantization, x, exact=3)


def test_fp16_on_fmlal_runs_on_the_emulated_device_and_matches_its_reference(arm_device):
    """--precision fp16 --target arm84: the digits ViT's linear layers fp16 `fmlal` kernels
    (fp16 products summed in fp32), dense and BSR, run on the emulated device and held to the
    PyTorch fp16 model; the asm has fmlal and fmlal2."""
    model, model_id = load_torch_model("vitsparse/digits_vit")
    plan = mlp_blocks_plan(model, model_id)
    compiled = compile_model(model_id, target="arm84", batch=4, plan=plan, precision="fp16")
    assert compiled.spec.key == "arm-aarch64-v84-fp16fml-fp16"
    depth = len(model.blocks)
    assert compiled.precision == "fp16" and len(compiled.reduced_layers) == 4 * depth
    decisions = {(d["kernel"], d.get("precision")) for d in compiled.sparsity_decisions}
    assert decisions == {("bsr", "fp16")} and len(compiled.sparsity_decisions) == 2 * depth
    asm = compiled.executable.mod.imports[0].inspect_source("asm")
    assert "fmlal\t" in asm and "fmlal2\t" in asm
    x = load_images("digits", image_size=compiled.input_shape[-1], limit=4).images
    output = _run_on(arm_device, compiled, x.numpy())
    base = apply_plan_to_torch(model, plan)
    assert_within_reference_noise(output, base, "fp16", x)  # as bf16's, on x86


def test_bench_reports_emulated_latency_as_emulated(arm_device):
    report = bench(
        tiny_vit(depth=1),
        target="arm",
        include=("torch-eager", "tvm-dense"),
        repeat=2,
        number=1,
        rpc=arm_device,
        progress=None,
    )
    row = report.row("tvm-dense")
    assert row.status == "ok" and row.device == "rpc:arm-qemu (emulated)"
    assert row.max_abs_err_vs_torch < 1e-4
    assert "emulated latency, not the hardware's" in row.detail
    # An emulated ARM latency is not compared with PyTorch on this machine's CPU.
    assert report.speedup == {}
    markdown = report.to_markdown()
    assert "rpc:arm-qemu (emulated): latency under emulation, not an ARM hardware number" in (
        markdown
    )


def test_missing_root_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITSPARSE_ARM_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(TargetError, match="setup_arm_qemu.sh"):
        arm_python()
    code = main(["rpc", "server", "--tracker", "127.0.0.1:9", "--qemu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "setup_arm_qemu.sh" in err and str(tmp_path / "nowhere") in err


def test_server_without_key_is_an_error(capsys):
    code = main(["rpc", "server", "--tracker", "127.0.0.1:9"])
    assert code == 2
    assert "--key" in capsys.readouterr().err


def test_profile_on_the_emulated_device(arm_device, tmp_path, monkeypatch):
    import dataclasses

    from test_profile import TINY

    from vitsparse.jobs.profile import GRIDS, profile

    grid = dataclasses.replace(TINY, k=(64,), densities=(0.5,), head_dim=(16,), held_out=1)
    monkeypatch.setitem(GRIDS, "small", grid)
    table = profile("arm", tmp_path / "cost.json", grid="small", rpc=arm_device, progress=None)
    assert table.complete and table.device == "rpc:arm-qemu"
    assert "qemu-user emulation" in table.emulated
    assert len(table.kernels) == 2 and len(table.blocks) == 1  # no axis leaves a held-out point
    assert all(r["ms"] > 0 for r in table.kernels + table.blocks)


def test_artifact_loader_runs_on_the_emulated_arm_device(tmp_path):
    """An aarch64 artifact run by its own run.py under the emulated device's Python, which has
    TVM's runtime and numpy but no torch, no vitsparse: the same loader as on x86."""
    import os
    import subprocess

    import torch

    try:
        python = arm_python()
    except TargetError as err:
        pytest.skip(str(err))
    model = tiny_vit(depth=2)
    out = compile_model(model, target="arm").export(tmp_path / "artifact")
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TVM_NUM_THREADS")}
    run = subprocess.run(
        [str(python), str(out / "run.py"), str(out), "--input", str(tmp_path / "x.npy")]
        + ["--output", str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "TVM_USE_RUNTIME_LIB": "1"},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=0, atol=1e-4)
