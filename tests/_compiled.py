"""Shared check: a plan compiled for this CPU equals the plan applied to PyTorch."""

import numpy as np
import torch

from vitsparse.jobs.compile import compile_model
from vitsparse.plan import apply_plan_to_torch


def assert_compiled_matches_torch(model, plan, *, batch=1, seed=0, atol=1e-4):
    """Compile ``model`` pruned by ``plan`` and compare with PyTorch; returns the compiled model."""
    compiled = compile_model(model, target="x86", batch=batch, plan=plan)
    x = np.random.default_rng(seed).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        ref = apply_plan_to_torch(model, plan)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(compiled.run(x), ref, rtol=0, atol=atol)
    return compiled
