"""Tuning jobs and per-target databases: seeding, resume, use at compile time, bad databases."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vitsparse.errors import DatabaseError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.compile import compile_model
from vitsparse.jobs.tune import tune
from vitsparse.schedules import database as dbmod
from vitsparse.targets import resolve_target


def test_ffi_pin_serialises_tvm_objects():
    # apache-tvm-ffi 0.1.15.post2 segfaults here, which crashes MetaSchedule; run it in a child.
    code = "import tvm; from tvm import tirx; print(len(tvm.ir.save_json(tirx.IntImm('int32', 3))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    model = tiny_vit(depth=2, embed_dim=32, num_heads=2)
    lines = []
    report = tune(model, target="x86", db=root, trials=4, progress=lines.append)
    return root, model, report, lines


def test_tune_seeds_every_kernel_with_the_hand_schedule(tuned_db):
    root, _, report, lines = tuned_db
    spec = resolve_target("x86")
    assert (root / spec.key / dbmod.RECORDS).stat().st_size > 0
    assert json.loads((root / spec.key / dbmod.TARGET_FILE).read_text())["key"] == spec.key
    seeded = [k for k in report.kernels if k.hand_ms is not None]
    assert len(seeded) >= len(report.kernels) - 1
    assert all(k.best_ms is not None and k.trials_after >= 1 for k in seeded)
    assert any("[tune]" in line for line in lines)


def test_tune_resumes_from_the_database(tuned_db):
    root, model, first, _ = tuned_db
    lines = []
    again = tune(model, target="x86", db=root, trials=4, progress=lines.append)
    assert any("nothing to do" in line for line in lines)
    assert [k.trials_after for k in again.kernels] == [k.trials_after for k in first.kernels]


def test_compile_uses_the_database(tuned_db):
    root, model, _, _ = tuned_db
    compiled = compile_model(model, target="x86", db=root)
    assert compiled.tuned_kernels > 0
    x = np.random.default_rng(0).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(compiled.run(x), ref, rtol=0, atol=1e-4)


def test_compile_without_records_for_the_target_is_untuned(tmp_path):
    compiled = compile_model(tiny_vit(depth=2), target="x86", db=tmp_path)
    assert compiled.tuned_kernels == 0


def test_corrupt_database_names_the_file_and_line(tmp_path):
    spec = resolve_target("x86")
    directory = tmp_path / spec.key
    directory.mkdir()
    (directory / dbmod.WORKLOADS).write_text('["ok"]\n{not json\n')
    with pytest.raises(DatabaseError, match=r"database_workload\.json is corrupt at line 2"):
        compile_model(tiny_vit(depth=2), target="x86", db=tmp_path)


def test_database_of_another_target_is_refused(tmp_path):
    spec = resolve_target("x86")
    directory = tmp_path / spec.key
    directory.mkdir()
    (directory / dbmod.TARGET_FILE).write_text(json.dumps({"key": "arm-aarch64-neon"}))
    with pytest.raises(DatabaseError, match="arm-aarch64-neon"):
        dbmod.open_target_database(tmp_path, spec, create=False)


def test_tuning_a_target_that_cannot_run_here_is_an_error(tmp_path):
    from vitsparse.errors import TargetError

    with pytest.raises(TargetError, match="this machine cannot. .* --rpc HOST:PORT --key KEY"):
        tune(tiny_vit(depth=2), target="arm", db=tmp_path, trials=1)


def test_bsr_kernels_are_searched_and_their_records_compiled(tmp_path):
    from vitsparse.frontend import import_model
    from vitsparse.jobs.compile import prepare
    from vitsparse.jobs.tune import tune_kernels
    from vitsparse.passes import pipeline
    from vitsparse.plan import apply_plan_to_torch
    from vitsparse.pruning import block_mask_plan
    from vitsparse.schedules.tuning import extract_kernels

    model = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    plan = block_mask_plan(model, model_id="tiny", block=(16, 16), keep=0.3, method="random")
    spec = resolve_target("x86")
    mod, config, params = prepare(import_model(model), spec, plan)
    mod = pipeline.optimize(mod, config, params, stop_before="schedule")
    decisions = config.decisions
    kernels = [k for k in extract_kernels(mod) if k.is_bsr]
    assert kernels and {d["kernel"] for d in decisions} == {"bsr"}
    assert not any(k.takes_indices for k in kernels)  # the runner fills BSR indices validly
    database = dbmod.open_target_database(tmp_path, spec, create=True)
    lines = []
    (result,) = tune_kernels(kernels[:1], spec, database, budget=9, say=lines.append)
    assert result.hand_ms is not None and result.trials_after > 1  # seed + searched trials
    assert result.best_ms <= result.hand_ms
    assert any("Trial #" in line for line in lines)

    compiled = compile_model(model, target="x86", plan=plan, db=tmp_path)
    assert compiled.tuned_kernels == 1
    x = np.random.default_rng(4).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        ref = apply_plan_to_torch(model, plan)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(compiled.run(x), ref, rtol=0, atol=1e-4)
