"""Shared checks: a plan compiled for this CPU equals the plan applied to PyTorch; a half-precision
model's output is within its reference's own noise."""

import numpy as np
import torch

from vitsparse.jobs.compile import compile_model
from vitsparse.plan import apply_plan_to_torch
from vitsparse.pruning.block_mask import block_mask_plan


def assert_compiled_matches_torch(model, plan, *, batch=1, seed=0, atol=1e-4):
    """Compile ``model`` pruned by ``plan`` and compare with PyTorch; returns the compiled model."""
    compiled = compile_model(model, target="x86", batch=batch, plan=plan)
    x = np.random.default_rng(seed).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        ref = apply_plan_to_torch(model, plan)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(compiled.run(x), ref, rtol=0, atol=atol)
    return compiled


def assert_within_reference_noise(output, base, precision, images):
    """``output`` (the compiled ``precision`` model on ``images``) against the PyTorch model of
    the same computation (`half_model` of ``base``, the plan applied). A float32 sum in another
    order moves a value across a bf16/fp16 rounding boundary now and then (~1e5 rounded values
    per image), so the reference is not reproducible to float32 noise even by itself: the
    compiled model is held to the reference's own spread under a 1e-6 relative input change,
    and must be far closer to it than fp32 is. Returns (error, noise, fp32's distance)."""
    from vitsparse.plan.quantize import half_model

    reference = half_model(base, precision)
    jitter = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(images).numpy()
        moved = reference(images * (1 + 1e-6 * jitter)).numpy()
        fp32 = base(images).numpy()
    error, noise = np.abs(output - ref).mean(), np.abs(moved - ref).mean()
    distance = np.abs(fp32 - ref).mean()
    assert error <= 3 * noise + 1e-5, (error, noise)
    assert error < 0.3 * distance, (error, distance)
    return error, noise, distance


def mlp_blocks_plan(model, model_id):
    """Half the blocks of every MLP layer: with no break-even measured for a remote target, the
    MLP layers become BSR kernels and attention's qkv and proj stay dense, one compile covering
    both kernels of a precision."""
    mlp = [name for name, _ in model.named_modules() if name.endswith(("mlp.fc1", "mlp.fc2"))]
    return block_mask_plan(model, model_id=model_id, block=(16, 16), keep=0.5, layers=mlp)


def assert_int8_exact_but_for_ties(output, base, quantization, images, *, exact):
    """``output`` (the compiled int8 model on ``images``) against `fake_quant_model` of ``base``
    with the compile's ``quantization``: exact (float32 noise) on at least ``exact`` images,
    within 1e-2 on every one (tests/test_precision.py says why an image may flip), and not the
    fp32 model."""
    from vitsparse.plan.quantize import fake_quant_model

    with torch.no_grad():
        reference = fake_quant_model(base, quantization)(images).numpy()
        fp32 = base(images).numpy()
    errors = np.abs(output - reference).max(axis=1)
    assert (errors <= 1e-2).all(), errors
    assert (errors <= 1e-4).sum() >= exact, errors
    assert np.abs(output - fp32).max() > 1e-3  # it is int8, not the float model
