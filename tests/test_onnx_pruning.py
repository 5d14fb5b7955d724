"""Block-mask pruning of an ONNX file: plans made from the file alone (magnitude, random and the
gradient-free LPViT score), compiled through the same passes, checked against ONNX Runtime on
the file with the pruned blocks zeroed, and the same masks on the PyTorch model it came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitsparse.cli import main
from vitsparse.errors import ModelError, PlanError
from vitsparse.frontend import import_model
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.compile import compile_model
from vitsparse.jobs.prune import predict, prune
from vitsparse.plan import PruningPlan, apply_plan_to_torch
from vitsparse.pruning.block_mask import block_mask_plan
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.onnx_masks import (
    input_second_moments,
    kept,
    masked_onnx,
    onnx_block_mask_plan,
    onnx_layers,
    onnx_lpvit_plan,
    run_onnx,
)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny_vit.onnx"
    torch.onnx.export(tiny_vit(depth=2), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True)
    return path


@pytest.fixture(scope="module")
def imported(onnx_file):
    return import_model(onnx_file)


def _images(n=4, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _torch_plan(plan: PruningPlan, model) -> PruningPlan:
    """The ONNX plan's masks as a plan of the PyTorch model the file was exported from."""
    from vitsparse.plan import weights_hash

    return PruningPlan(
        model_id="tiny", weights_hash=weights_hash(model), method=plan.method, layers=plan.layers
    )


def test_layers_take_timm_names_and_magnitude_masks_match_the_pytorch_plans(imported):
    assert list(onnx_layers(imported))[:4] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    ours = onnx_block_mask_plan(imported, block=(16, 16), keep=0.5)
    theirs = block_mask_plan(tiny_vit(depth=2), model_id="tiny", block=(16, 16), keep=0.5)
    assert ours.layers == theirs.layers  # the same weights, the same L1 scores
    assert ours.model_id == "tiny_vit" and ours.weights_seed is None


def test_compiled_onnx_plan_matches_onnxruntime_on_the_masked_file(imported, onnx_file, tmp_path):
    plan = onnx_block_mask_plan(imported, block=(16, 16), keep=0.25, method="random", seed=2)
    x = _images(1)
    compiled = compile_model(onnx_file, plan=plan)
    assert len(compiled.sparsity_decisions) == len(plan.layers)  # all through BlockSparsify
    out = compiled.run(x)
    masked = masked_onnx(onnx_file, plan, imported, tmp_path / "masked.onnx")
    reference = run_onnx(masked, x)
    np.testing.assert_allclose(out, reference, atol=1e-4)
    assert np.abs(reference - run_onnx(onnx_file, x)).max() > 1e-3  # the masks change it
    # ... and the same masks on the PyTorch model agree.
    model = tiny_vit(depth=2)
    with torch.no_grad():
        torch_out = apply_plan_to_torch(model, _torch_plan(plan, model))(torch.from_numpy(x))
    np.testing.assert_allclose(reference, torch_out.numpy(), atol=1e-4)


def test_activation_moments_are_those_pytorch_sees(imported, onnx_file):
    images = _images(3)
    layers = onnx_layers(imported)
    moments = input_second_moments(onnx_file, layers.values(), images)
    model = tiny_vit(depth=2)
    seen: dict[str, list] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, args, _out, name=name: seen.setdefault(name, []).append(args[0])
        )
        for name in layers
    ]
    with torch.no_grad():
        model(torch.from_numpy(images))
    for h in hooks:
        h.remove()
    for name, weight in layers.items():
        x = torch.cat(seen[name]).reshape(-1, seen[name][0].shape[-1]).double()
        np.testing.assert_allclose(moments[weight], (x**2).mean(0).numpy(), rtol=1e-4)


def test_lpvit_plan_meets_its_budget_is_deterministic_and_compiles(imported, onnx_file):
    images = _images(8)
    plan = onnx_lpvit_plan(imported, images, Budget("flops", 0.8))
    assert plan == onnx_lpvit_plan(imported, images, Budget("flops", 0.8))
    fraction, _ = kept(imported, plan, "flops")
    assert fraction <= 0.8 + 1e-6 and fraction > 0.7
    densities = sorted(m.density for m in plan.layers.values())
    assert densities[0] < densities[-1]  # allocated across layers, not uniform
    x = images[:1]
    out = compile_model(onnx_file, plan=plan).run(x)
    with torch.no_grad():
        model = tiny_vit(depth=2)
        ref = apply_plan_to_torch(model, _torch_plan(plan, model))(torch.from_numpy(x))
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4)
    # The counts agree with the PyTorch model's.
    from vitsparse.pruning import flops as counts

    model = tiny_vit(depth=2)
    torch_plan = _torch_plan(plan, model)
    assert fraction == pytest.approx(counts.flops(model, torch_plan).ratio(counts.flops(model)))
    p = predict(onnx_file, plan, calib="synthetic", calib_size=4)
    assert p.flops_kept == pytest.approx(fraction) and 0 <= p.agreement <= 1 and p.mean_kl >= 0


def test_onnx_prune_refusals(onnx_file, imported):
    with pytest.raises(PlanError, match="structural pruning needs the PyTorch model"):
        prune(onnx_file, method="magnitude", heads=0.5)
    with pytest.raises(PlanError, match="not nvit"):
        prune(onnx_file, method="nvit", budget="flops=0.5")
    with pytest.raises(ModelError, match="holds its weights"):
        prune(onnx_file, method="magnitude", blocks="16x16:0.5", checkpoint="x.pth")
    with pytest.raises(PlanError, match="matches no linear layer"):
        prune(onnx_file, method="magnitude", blocks="16x16:0.5", layers=["head"])
    other = onnx_block_mask_plan(imported, block=(16, 16), keep=0.5)
    model = tiny_vit(depth=2)
    with pytest.raises(PlanError, match="other weights"):
        compile_model(onnx_file, plan=_torch_plan(other, model))


def test_cli_prunes_an_onnx_file_and_bench_checks_it_against_onnxruntime(
    onnx_file, tmp_path, capsys
):
    out = tmp_path / "plan.json"
    code = main(
        ["prune", str(onnx_file), "--method", "magnitude", "--blocks", "16x16:0.5"]
        + [
            "-o",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert PruningPlan.load(out).mean_density == 0.5
    report_path = tmp_path / "bench.json"
    code = main(
        ["bench", str(onnx_file), "--plan", str(out), "--repeat", "2", "--threads", "2"]
        + ["--runtimes", "torch-pruned,tvm-pruned", "--json", str(report_path)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {r["runtime"]: r for r in json.loads(report_path.read_text())["rows"]}
    assert rows["torch-pruned"]["status"] != "ok"
    assert rows["tvm-pruned"]["status"] == "ok"
    assert rows["tvm-pruned"]["max_abs_err_vs_torch"] < 1e-4
    refused = tmp_path / "refused.json"
    code = main(
        ["prune", str(onnx_file), "--method", "magnitude", "--heads", "0.5", "-o", str(refused)]
    )
    assert code == 2 and "structural pruning" in capsys.readouterr().err
    assert not refused.exists()
