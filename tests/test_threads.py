"""Compiled models run on every core the process may use unless the user says otherwise (TVM's
runtime alone takes half of the logical CPUs on x86: one thread on a 2-vCPU machine)."""

import json
import os
import subprocess
import sys

import pytest

from vitsparse.devices import available_cores

# Compiles a small ViT with enough work per layer for threads to matter, then times run().
RUN = """
import json, time
import numpy as np
import vitsparse
from vitsparse._tvm import tvm
from vitsparse.frontend.testing import tiny_vit

model = tiny_vit(depth=1, embed_dim=192, num_heads=3, img_size=224, patch_size=16)
compiled = vitsparse.compile_model(model, target="x86")
x = np.random.default_rng(0).standard_normal(compiled.input_shape, dtype=np.float32)
for _ in range(10):
    compiled.run(x)
samples = []
for _ in range(60):
    start = time.perf_counter()
    compiled.run(x)
    samples.append(time.perf_counter() - start)
print(json.dumps({"median_ms": float(np.median(samples)) * 1e3,
                  "pool": int(tvm.get_global_func("runtime.NumThreads")())}))
"""


def _run(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    # The pool governor shrinks the pool to one thread while other processes (a busy CI machine)
    # hold the cores; it has its own tests below. Here: the size the pool starts at.
    env["VITSPARSE_ADAPTIVE_POOL"] = "0"
    if threads is not None:
        env["TVM_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(available_cores() < 2, reason="one core: nothing to parallelise")
def test_run_uses_every_core_without_thread_settings():
    cores = available_cores()
    # Each setting twice, alternating, best of each: a busy spell of the machine hits both.
    default, explicit = [], []
    for _ in range(2):
        default.append(_run(None))
        explicit.append(_run(cores))
    assert {r["pool"] for r in default} == {cores}
    fastest_default = min(r["median_ms"] for r in default)
    fastest_explicit = min(r["median_ms"] for r in explicit)
    assert fastest_default <= 1.15 * fastest_explicit, (default, explicit)


def test_the_users_thread_count_is_kept():
    assert _run(1)["pool"] == 1


def test_pool_settings_are_set_where_the_user_set_none():
    from vitsparse._tvm import POOL_SETTINGS
    from vitsparse.jobs import artifact_run

    assert artifact_run.POOL_SETTINGS == POOL_SETTINGS  # the runtime-only loader's copy
    show = (
        "import json, os, vitsparse._tvm as t; "
        "print(json.dumps({k: os.environ[k] for k in t.POOL_SETTINGS}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in POOL_SETTINGS}
    for given in ({}, {"TVM_BIND_THREADS": "1"}):
        proc = subprocess.run(
            [sys.executable, "-c", show], env={**env, **given}, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == {**POOL_SETTINGS, **given}


def test_the_pool_governor_runs_one_thread_while_the_cores_are_busy(monkeypatch):
    from vitsparse.jobs.artifact_run import PoolGovernor

    monkeypatch.delenv("VITSPARSE_ADAPTIVE_POOL", raising=False)
    now, sizes = [0.0], []
    governor = PoolGovernor(2, sizes.append, clock=lambda: now[0])

    def run(seconds):
        def fn():
            now[0] += seconds
            return seconds

        return governor.run(fn)

    assert run(0.010) == 0.010 and run(0.011) and sizes == []  # free cores: the full pool
    run(0.050)  # 5x the best: other processes hold the cores
    assert sizes == [1] and governor.single
    run(0.030)
    assert sizes == [1]  # one thread until the retry
    now[0] += 2.0
    run(0.050)  # the full pool again: still slow, back to one thread, the wait doubles
    assert sizes == [1, 2, 1] and governor.wait == 4.0
    now[0] += 4.0
    run(0.010)  # the cores are free again
    assert sizes == [1, 2, 1, 2] and not governor.single
    monkeypatch.setenv("VITSPARSE_ADAPTIVE_POOL", "0")
    off = PoolGovernor(2, sizes.append, clock=lambda: now[0])
    off.run(lambda: None)
    assert not off.enabled and sizes == [1, 2, 1, 2]
    assert not PoolGovernor(1, sizes.append).enabled  # one thread: nothing to govern
