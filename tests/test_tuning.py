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


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    """What kill -9 during an append leaves: the last line cut off, no newline. The records
    before it stand; a bad line that is not the last (or that ends its line) stays an error."""
    spec = resolve_target("x86")
    directory = tmp_path / spec.key
    directory.mkdir()
    records = directory / dbmod.RECORDS
    records.write_text('["a", 1]\n["b", 2]\n["c", [3, 4')
    with pytest.warns(UserWarning, match=r"line 3, the last, is cut off .* 2 record\(s\) kept"):
        dbmod.validate(directory, spec)
    assert records.read_text() == '["a", 1]\n["b", 2]\n'
    records.write_text('["a", 1]\n["c", [3, 4\n["b", 2]')
    with pytest.raises(DatabaseError, match="corrupt at line 2"):
        dbmod.validate(directory, spec)


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
    (result,) = tune_kernels(kernels[:1], spec, database, budget=5, say=lines.append)
    assert result.hand_ms is not None and result.trials_after > 1  # seed + searched trials
    assert result.best_ms <= result.hand_ms
    assert any("Trial #" in line for line in lines)

    compiled = compile_model(model, target="x86", plan=plan, db=tmp_path)
    assert compiled.tuned_kernels == 1
    x = np.random.default_rng(4).standard_normal(compiled.input_shape, dtype=np.float32)
    with torch.no_grad():
        ref = apply_plan_to_torch(model, plan)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(compiled.run(x), ref, rtol=0, atol=1e-4)


def _records(db) -> int:
    files = list(db.glob(f"*/{dbmod.RECORDS}"))
    return sum(1 for f in files for line in f.read_text().splitlines() if line.strip())


def _tune_until(cmd, log, db, ready, timeout=240.0) -> int:
    """Run ``cmd`` (stdout to ``log``), kill -9 it once ``ready(log text, records)`` holds;
    the records then in the database."""
    import os
    import signal
    import time

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if ready(log.read_text(), _records(db)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"tune ended before it could be killed:\n{log.read_text()}"
        assert time.time() < deadline, f"never ready:\n{log.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _records(db)


def test_each_batch_is_committed_before_the_next_kernel_is_picked():
    """The scheduler behind the kill -9 guarantee, on a stand-in for MetaSchedule's loop: the
    kernel just sent is joined (measured and committed) before the next pick, picks follow the
    weights, and a finished kernel is neither joined nor picked again."""
    from types import SimpleNamespace

    from vitsparse.schedules.tuning import CommitEachBatch

    events = []
    tasks = [SimpleNamespace(is_terminated=False) for _ in range(2)]
    loop = CommitEachBatch([2.0, 1.0])
    loop._scheduler = SimpleNamespace(tasks_=tasks, join_running_task=lambda i: events.append(i))
    picks = []
    for _ in range(3):
        picks.append(loop.next_task_id())
    assert picks == [0, 1, 0] and events == [0, 1]  # twice the weight, twice the batches
    tasks[0].is_terminated = True
    assert loop.next_task_id() == 1 and events == [0, 1]  # kernel 0 ended: not joined again
    tasks[1].is_terminated = True
    assert loop.next_task_id() == -1 and events == [0, 1]


@pytest.mark.slow  # four minutes of real tuning; the scheduler's order is tested above
def test_kill_9_during_tune_loses_at_most_the_batch_in_flight(tmp_path):
    """A real `vitsparse tune` killed with SIGKILL while seeding and again while searching:
    every searched batch is committed before the next is sent, so the records grow between
    kills (MetaSchedule's own scheduler commits nothing until every kernel has had a batch),
    and the last run resumes from them and finishes the budget."""
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "vitsparse.cli", "tune", "vitsparse/digits_vit", "--db", str(db)]
    cmd += ["--trials", "16"]  # two batches of 8: one committed before the second kill
    counts = [_tune_until(cmd, tmp_path / "1.log", db, lambda _text, n: n >= 2)]
    for i in (2,):
        state = {}

        def searched(text, n, state=state):
            """True once a searched batch is committed: the records grew after the search
            began (the seeds are all in by then)."""
            if "searching" in text:
                state.setdefault("at", n)
            return "at" in state and n > state["at"]

        counts.append(_tune_until(cmd, tmp_path / f"{i}.log", db, searched))
        assert "already in the database" in (tmp_path / f"{i}.log").read_text()
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    counts.append(_records(db))
    assert final.stdout.count("(budget 16 trials)") == 1  # the summary, printed once
    assert counts == sorted(counts) and counts[0] < counts[1] < counts[2], counts
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "already spent" in again.stderr, again.stderr[-2000:]  # progress goes to stderr


def test_metaschedule_skips_tvms_tensor_intrinsics_until_a_search_needs_them():
    """TuneContext and MetaSchedule's builder workers import tvm.s_tir.tensor_intrin, whose
    __init__ parses every intrinsic TVM ships (~40 s per process here); vitsparse's shell
    package makes that import free, and `load` brings in what a CPU search's default rules
    name. In a fresh process, as a user's `tune` starts."""
    script = (
        "import sys, time; import vitsparse._tvm as t\n"
        "from vitsparse import _tvm_intrin\n"
        "start = time.time(); t.ms.TuneContext(task_name='x'); took = time.time() - start\n"
        "mods = [m for m in sys.modules if m.startswith(_tvm_intrin.PACKAGE + '.')]\n"
        "assert took < 5 and not mods, (took, mods)\n"
        "assert t.TensorIntrin.get('dot_16x4_vnni', allow_missing=True) is None\n"
        "_tvm_intrin.load('llvm')\n"
        "assert t.TensorIntrin.get('dot_16x4_vnni') is not None\n"
        "assert _tvm_intrin.PACKAGE + '.cuda' not in sys.modules\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
