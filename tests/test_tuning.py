"""Tuning jobs and per-target databases: seeding, resume, use at compile time, bad databases."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vitsparse.compiler import compile_model
from vitsparse.errors import DatabaseError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.schedules import database as dbmod
from vitsparse.schedules.tuning import tune
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

    with pytest.raises(TargetError, match="cannot"):
        tune(tiny_vit(depth=2), target="arm", db=tmp_path, trials=1)
