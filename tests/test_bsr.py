"""The x86 BSR kernel: packing and numerics against numpy for square and rectangular blocks."""

import numpy as np
import pytest

from vitsparse._tvm import Target, tvm
from vitsparse.schedules import bsr

TARGET = Target({"kind": "llvm", "num-cores": 2})


def _run(m, weight, bias, x):
    func = bsr.bsr_primfunc(m, weight).with_attr("global_symbol", "main")
    lib = tvm.compile(func, target=TARGET)
    y = tvm.runtime.tensor(np.zeros((m, weight.shape[0]), np.float32))
    args = [x, weight.data, weight.indices, weight.indptr, bias]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


@pytest.mark.parametrize(
    ("m", "k", "n", "block", "keep"),
    [
        (197, 128, 96, (32, 32), 0.5),
        (197, 64, 64, (16, 16), 0.3),
        (5, 128, 128, (64, 32), 0.7),
        (37, 64, 64, (32, 64), 0.5),
        (16, 32, 16, (8, 16), 0.5),
        (9, 64, 64, (16, 16), 0.0),
    ],
)
def test_bsr_kernel_matches_masked_dense(m, k, n, block, keep):
    rng = np.random.default_rng(0)
    rows, cols = block
    w = rng.standard_normal((n, k), dtype=np.float32)
    kept = rng.random((n // rows, k // cols)) < keep
    b = rng.standard_normal(n, dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    weight = bsr.to_bsr(w, kept, block)
    masked = w * np.kron(kept, np.ones(block, dtype=np.float32))
    np.testing.assert_array_equal(weight.to_dense(), masked)
    assert weight.density == pytest.approx(kept.mean())
    np.testing.assert_allclose(_run(m, weight, b, x), x @ masked.T + b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("block", "shape", "match"),
    [((24, 24), (48, 48), "must be one of"), ((64, 64), (32, 64), "does not divide")],
)
def test_to_bsr_rejects_bad_blocks(block, shape, match):
    with pytest.raises(ValueError, match=match):
        bsr.to_bsr(np.zeros(shape, np.float32), np.ones((1, 1), bool), block)
