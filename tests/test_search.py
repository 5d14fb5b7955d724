"""The measured search loop: budgets in measured units, the corrected cost model, and
`vitsparse search` compiling and measuring the digits ViT for real on this machine (and over a
real RPC tracker and server), converging, resuming from its journal, refusing bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vitsparse.cli import main
from vitsparse.devices.meters import Meter, NoMeter
from vitsparse.devices.rpc import RpcDevice, start_server, start_tracker
from vitsparse.errors import PlanError, SearchError, TargetError
from vitsparse.frontend import load_torch_model
from vitsparse.jobs.profile import Grid
from vitsparse.jobs.prune import prune
from vitsparse.jobs.search import JOURNAL, WINDOW, Journal, search
from vitsparse.plan import geometry_of
from vitsparse.pruning.budget import MeasuredBudget, parse_budget
from vitsparse.pruning.fractions import structure_plan
from vitsparse.pruning.latency import LatencyModel
from vitsparse.targets.cost_table import CostTable, block_key, kernel_key

MODEL = "vitsparse/digits_vit"
# The real search of the module's fixture (and its re-runs): 70% of the measured dense latency.
SEARCH = dict(
    budget="latency=0.7",
    methods=("magnitude-structure", "cpvit"),
    data="digits",
    calib_size=32,
    eval_size=128,
    iterations=6,
)


@pytest.mark.parametrize(
    "text, metric, value, relative",
    [
        ("latency=12.5ms", "latency", 12.5, False),
        ("latency=0.02s", "latency", 20.0, False),
        ("latency=0.5", "latency", 0.5, True),
        ("energy=40mJ", "energy", 40.0, False),
        ("energy = 0.3 J", "energy", 300.0, False),
        ("energy=0.5", "energy", 0.5, True),
    ],
)
def test_measured_budgets_parse(text, metric, value, relative):
    budget = parse_budget(text, batch=8, threads=2)
    assert (budget.metric, budget.value, budget.relative) == (
        metric,
        pytest.approx(value),
        relative,
    )
    assert budget.batch == 8 and budget.threads == 2
    assert "batch 8, 2 threads" in budget.describe()
    assert budget.absolute(10.0) == pytest.approx(value * 10 if relative else value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("latency=0", "not a fraction"),
        ("latency=1.5", "not a fraction"),
        ("latency=-3ms", "not a positive amount"),
        ("latency=5mJ", "mj is not a unit of latency"),
        ("energy=5ms", "ms is not a unit of energy"),
        ("latency=fast", "is not latency=12.5ms"),
    ],
)
def test_bad_measured_budgets_are_named(text, message):
    with pytest.raises(PlanError, match=message):
        MeasuredBudget.parse(text)


def test_prune_sends_measured_budgets_to_search():
    with pytest.raises(PlanError, match="vitsparse search"):
        prune(MODEL, method="nvit", budget="latency=0.5")


def _analytic_table(model, scale: float) -> CostTable:
    """A cost table for ``model``'s grid with latencies proportional to multiply-accumulates,
    times ``scale``: what a test sets deliberately wrong."""
    geo = geometry_of(model)
    grid = Grid.for_geometry(
        geo.embed_dim, 4, 16, geo.mlp_dim[0], geo.num_patches + geo.num_prefix_tokens
    )
    table = CostTable(target={"key": "x"}, device="cpu", grid=grid.name, complete=True)
    for p in grid.kernel_points():
        ms = (
            scale
            * 1e-6
            * p["m"]
            * p["k"]
            * p["n"]
            * (p["density"] * 1.5 if p["op"] == "bsr" else 1)
        )
        table.kernels.append(dict(p, key=kernel_key(p), ms=ms, energy_j=None))
    for p in grid.block_points():
        width = 4 * p["heads"] * p["head_dim"] + 2 * p["mlp"]
        ms = scale * (1e-6 * p["tokens"] * p["embed"] * width + 2e-3)
        table.blocks.append(dict(p, key=block_key(p), ms=ms, energy_j=None))
    return table


def test_the_correction_reproduces_what_it_measured_and_carries_to_new_shapes():
    model, _ = load_torch_model(MODEL)
    cost = LatencyModel(_analytic_table(model, 1.0))
    half = structure_plan(model, heads=0.5, mlp=0.5)
    quarter = structure_plan(model, heads=0.25, mlp=0.25)
    raw = cost.raw(model, half)
    assert cost.predict(model, half) == pytest.approx(raw)  # nothing measured: the table
    cost.observe(model, None, 2.0 * cost.raw(model, None), "dense")
    cost.observe(model, half, 3.0 * raw, "half")
    assert cost.predict(model, half) == pytest.approx(3.0 * raw)  # measured shapes: as measured
    assert cost.predict(model, None) == pytest.approx(2.0 * cost.raw(model, None))
    # The dense model fixed the rest (patch embedding, classifier) at 2x; half's blocks took
    # what half measured beyond it. A shape never measured takes its nearest measured shape's
    # factor: quarter's blocks are nearer half's than the dense ones.
    parts = cost.components(model, half)
    rest = sum(c for k, c in parts.items() if k.startswith("rest"))
    assert 0 < rest < raw
    blocks = (3.0 * raw - 2.0 * rest) / (raw - rest)
    q = cost.components(model, quarter)
    q_rest = sum(c for k, c in q.items() if k.startswith("rest"))
    expected = 2.0 * q_rest + blocks * (cost.raw(model, quarter) - q_rest)
    assert cost.predict(model, quarter) == pytest.approx(expected)
    # it is a criterion's cost model too: model_cost of a structure, saving of blocks
    assert cost.model_cost(model, half) == pytest.approx(3.0 * raw)
    assert cost.for_block((16, 16)).saving("blocks.0.mlp.fc1", (256, 64), 65, 0.9) > 0


def test_shapes_a_plan_shares_with_the_dense_model_keep_the_dense_factor():
    """A token plan's first blocks are dense: the dense measurement priced them, and what the
    plan measured beyond them is its pruned blocks' alone (the flaw of one whole-plan ratio
    per plan: the dense blocks were re-priced by every plan that held them)."""
    model, _ = load_torch_model(MODEL)
    cost = LatencyModel(_analytic_table(model, 1.0))
    tokens = structure_plan(model, tokens="0.5@2,3")
    parts = cost.components(model, tokens)
    dense_parts = cost.components(model, None)
    shared = {k: c for k, c in parts.items() if k in dense_parts}
    new = {k: c for k, c in parts.items() if k not in dense_parts}
    assert shared and new
    cost.observe(model, None, 2.0 * cost.raw(model, None), "dense")
    measured = 2.0 * sum(shared.values()) + 5.0 * sum(new.values())
    cost.observe(model, tokens, measured, "tokens")
    factors = cost.factors()
    assert all(factors[k] == pytest.approx(2.0) for k in shared)
    assert all(factors[k] == pytest.approx(5.0) for k in new)
    assert cost.predict(model, None) == pytest.approx(2.0 * cost.raw(model, None))


@pytest.fixture(scope="module")
def digits():
    return load_torch_model(MODEL)[0]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, digits):
    """One real search: the digits ViT at 70% of its measured latency, two methods, a cost
    table deliberately 2x off."""
    out = tmp_path_factory.mktemp("search")
    lines = []
    table = _off_by_two(digits)
    report = search(MODEL, out=out, cost_table=table, progress=lines.append, **SEARCH)
    return out, report, lines, table


def _off_by_two(model) -> CostTable:
    """The analytic table scaled so that it predicts the dense model at twice what it takes."""
    from vitsparse.jobs.compile import compile_model

    compiled = compile_model(MODEL)
    import numpy as np

    x = np.zeros(compiled.input_shape, np.float32)
    dense_ms = compiled.time(x, repeat=5).median_ms
    table = _analytic_table(model, 1.0)
    return _analytic_table(model, 2.0 * dense_ms / LatencyModel(table).raw(model, None))


def test_search_converges_inside_the_budget_on_the_real_machine(searched):
    out, report, lines, _ = searched
    assert report.limit == pytest.approx(0.7 * report.dense["measured"])
    chosen = report.chosen
    assert chosen["correct"] and chosen["measured"] <= report.limit
    assert chosen["top1"] is not None and chosen["agreement"] is not None
    for method in ("magnitude-structure", "cpvit"):
        rows = [c for c in report.candidates if c["method"] == method]
        assert rows, method
        assert all(c["correct"] for c in rows)
        # a method stops at its first candidate inside the window, or says why it did not
        inside = [i for i, c in enumerate(rows) if c["within"]]
        assert inside == [len(rows) - 1] or (
            not inside and any(n.startswith(f"{method}: ") for n in report.notes)
        )
    assert any(c["within"] for c in report.candidates)  # cpvit reaches 0.7 of dense
    assert any("predicted" in line and "measured" in line for line in lines)
    for name in (JOURNAL, "front.md", "front.png", "plan.json", "search.json"):
        assert (out / name).is_file(), name
    assert (out / "artifact" / "manifest.json").is_file()
    front = (out / "front.md").read_text()
    assert f"[{WINDOW[0]}, {WINDOW[1]}]" in front and "cpvit" in front


def test_the_correction_shrinks_the_error_of_a_table_2x_off(digits):
    """A device whose true costs are another shape of table (a larger fixed cost per block) at
    half the scale; the loop's table is the analytic one, so it is off by 2x and more. After
    each measurement the corrected prediction of the next plan is far closer than the table's."""
    table = _analytic_table(digits, 1.0)
    truth = _analytic_table(digits, 0.5)
    for row in truth.blocks:
        row["ms"] += 0.5 * 4e-3
    device, cost = LatencyModel(truth), LatencyModel(table)
    cost.observe(digits, None, device.raw(digits, None), "dense")
    for f in (0.8, 0.6, 0.45, 0.3):
        plan = structure_plan(digits, heads=f, mlp=f, tokens=f"{f}@2,3")
        measured = device.raw(digits, plan)
        raw_error = abs(cost.raw(digits, plan) / measured - 1)
        corrected_error = abs(cost.predict(digits, plan) / measured - 1)
        assert raw_error > 0.5 and corrected_error < raw_error / 4, (f, raw_error, corrected_error)
        cost.observe(digits, plan, measured, f"f={f}")


def test_a_rerun_resumes_from_the_journal_without_measuring(searched, monkeypatch):
    out, report, _, table = searched
    before = (out / JOURNAL).read_text()
    from vitsparse.jobs import search as search_mod

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(search_mod, "measure", no_measuring)
    lines = []
    again = search(MODEL, out=out, cost_table=table, progress=lines.append, **SEARCH)
    assert (out / JOURNAL).read_text() == before
    assert sum("from the journal" in line for line in lines) == len(report.candidates) + 1
    assert again.chosen["key"] == report.chosen["key"]


def test_a_journal_of_another_search_or_a_damaged_one_is_refused(searched, tmp_path):
    out, _, _, table = searched
    with pytest.raises(SearchError, match="another budget"):
        search(MODEL, budget="latency=0.5", out=out, methods=("cpvit",), data="digits")
    with pytest.raises(SearchError, match="another cost_table"):
        other = _analytic_table(load_torch_model(MODEL)[0], 3.0)
        search(MODEL, out=out, cost_table=other, progress=None, **SEARCH)
    assert (out / JOURNAL).read_text().count("\n") > 2  # the refused search changed nothing
    damaged = tmp_path / JOURNAL
    damaged.write_text('{"kind": "header"}\n{"kind": \n{"kind": "dense"}\n')
    with pytest.raises(SearchError, match="line 2 is not JSON"):
        Journal.open(damaged)
    damaged.write_text('{"kind": "header"}\n[1, 2]\n')
    with pytest.raises(SearchError, match="line 2 is not a JSON object"):
        Journal.open(damaged)
    damaged.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SearchError, match="not a search journal"):
        Journal.open(damaged)
    damaged.write_text('{"kind": "header"}\n{"kind": "den')  # a torn last line: skipped
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert len(Journal.open(damaged).entries) == 1


def test_unreachable_budgets_and_missing_meters_are_errors(tmp_path, capsys, digits, monkeypatch):
    from vitsparse.jobs import search as search_mod

    monkeypatch.setattr(search_mod, "meter_for", lambda _device: NoMeter("no meter in this test"))
    table = _analytic_table(digits, 1.0)
    with pytest.raises(SearchError, match="no plan reached latency <= 0.0001 ms") as err:
        search(
            MODEL,
            budget="latency=0.0001ms",
            out=tmp_path / "tight",
            methods=("magnitude-structure",),
            data="synthetic",
            iterations=1,
            cost_table=table,
            progress=None,
        )
    assert "journal is kept" in str(err.value)
    assert (tmp_path / "tight" / JOURNAL).is_file()
    with pytest.raises(TargetError, match="needs a power meter.*no meter in this test"):
        search(MODEL, budget="energy=0.5", out=tmp_path / "e", cost_table=table, progress=None)
    assert not (tmp_path / "e").exists()
    code = main(["search", MODEL, "--budget", "latency=2", "-o", str(tmp_path / "x")])
    assert code == 2 and "not a fraction" in capsys.readouterr().err
    code = main(["search", MODEL, "--budget", "flops=0.5", "-o", str(tmp_path / "x")])
    assert code == 2 and "is not latency=12.5ms" in capsys.readouterr().err


def test_search_over_rpc_measures_on_the_device(tmp_path, digits):
    tracker = start_tracker("127.0.0.1", 9395)
    address = f"127.0.0.1:{tracker.port}"
    server = start_server(address, "search-x86", port=9495)
    try:
        device = RpcDevice(address, "search-x86")
        for _ in range(50):
            try:
                device.check()
                break
            except TargetError:
                time.sleep(0.2)
        # The test is about where candidates are measured, not whether the budget holds: the
        # digits ViT's 0.3 ms latencies move by 10-30% between runs over RPC on a busy 2-core
        # machine, so a missed budget (a SearchError naming it) is judged by the journal too.
        try:
            report = search(
                MODEL,
                budget="latency=0.95",
                out=tmp_path / "rpc",
                rpc=device,
                methods=("cpvit",),
                data="synthetic",
                calib_size=16,
                iterations=2,
                cost_table=_analytic_table(digits, 1.0),
                progress=None,
            )
            assert report.device == "rpc:search-x86"
        except SearchError as missed:
            assert "no plan reached latency <= 0.95" in str(missed), missed
    finally:
        server.terminate()
        tracker.terminate()
    entries = Journal.open(tmp_path / "rpc" / JOURNAL).entries
    assert entries[0]["kind"] == "header" and entries[0]["device"] == "rpc:search-x86"
    measured = [e for e in entries if e["kind"] in ("dense", "candidate")]
    candidates = [e for e in measured if e["kind"] == "candidate"]
    assert candidates and len(measured) > len(candidates)
    assert all(e["where"].startswith("rpc:search-x86") for e in measured)
    assert all(e["correct"] for e in candidates)


def test_kill_9_then_rerun_resumes_without_measuring_again(tmp_path, digits):
    table = tmp_path / "cost.json"
    _analytic_table(digits, 1.0).save(table)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "vitsparse.cli", "search", MODEL, "--budget", "latency=0.8"]
    # one method, three candidates: a kill after the first leaves two to measure on the re-run
    command += ["--methods", "cpvit", "--iterations", "3", "--data", "synthetic"]
    command += ["--calib-size", "16", "--cost-table", str(table), "-o", str(out)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = out / JOURNAL
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:  # header, dense, one
            break
        time.sleep(0.05)
    assert job.poll() is None, "the search ended before it could be killed"
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    kept = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len(kept) >= 3
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    # The test is about resuming: the re-run may miss the budget (the digits ViT's 0.4 ms
    # latencies are noisy, and pruning gains it little), which it names, exiting 2.
    missed = rerun.returncode == 2 and "no plan reached latency <= 0.8" in rerun.stderr
    assert rerun.returncode == 0 or missed, rerun.stderr
    replayed = rerun.stderr.count("from the journal") + rerun.stdout.count("from the journal")
    assert replayed >= len(kept) - 1  # the dense model and every candidate measured before
    final = [json.loads(line) for line in journal.read_text().splitlines()]
    assert final[: len(kept)] == kept


class _ConstantPowerMeter(Meter):
    """A test double for a power meter: a constant 20 W, so the energy per run follows the
    latency (this host has no meter to read)."""

    name, available, reason = "constant-20W", True, ""

    def start(self) -> None:
        self.started = time.perf_counter()

    def joules(self) -> float:
        return 20.0 * (time.perf_counter() - self.started)


def test_an_energy_budget_searches_in_millijoules(tmp_path, digits, monkeypatch):
    from vitsparse.jobs import search as search_mod

    monkeypatch.setattr(search_mod, "meter_for", lambda _device: _ConstantPowerMeter())
    report = search(
        MODEL,
        budget="energy=0.85",  # 0.6 is near the floor of what pruning reaches; 0.75 missed once,
        # on a busy machine, with 3 candidates
        out=tmp_path / "energy",
        methods=("cpvit",),
        data="synthetic",
        calib_size=16,
        iterations=3,
        cost_table=_analytic_table(digits, 1.0),
        energy_seconds=0.3,
        progress=None,
    )
    assert report.unit == "mJ" and report.dense["measured"] == report.dense["energy_mj"] > 0
    for c in report.candidates:  # a relative budget: the ratio to dense, in the dense's mJ
        assert c["energy_mj"] > 0
        assert c["measured"] == pytest.approx(c["ratio_to_dense"] * report.dense["measured"])
    assert (
        report.chosen["measured"] <= report.limit == pytest.approx(0.85 * report.dense["energy_mj"])
    )


def test_an_int8_search_compiles_checks_and_judges_its_candidates_in_int8(tmp_path, digits):
    """--precision int8: candidates calibrated, compiled and checked in int8 against the int8
    PyTorch model (not fp32), measured against the fp32 dense model; the journal records the
    precision, so neither an fp32 re-run nor a journal without it resumes into the other."""
    out = tmp_path / "int8"
    common = dict(
        # loose: the digits ViT's int8 layers are too small to gain, its 0.4 ms noisy, and
        # this test is about the precision, not convergence (tested above)
        budget="latency=0.95",
        out=out,
        methods=("magnitude-structure",),
        data="digits",
        calib_size=16,
        eval_size=64,
        iterations=4,
        cost_table=_analytic_table(digits, 1.0),
        progress=None,
    )
    report = search(MODEL, precision="int8", **common)
    assert report.precision == "int8" and "candidates in int8" in report.summary()
    assert report.candidates
    for c in report.candidates:
        assert c["precision"] == "int8" and c["correct"], c
        # held to the int8 reference, far closer than that reference is to fp32
        assert c["max_abs_err"] < 0.3 * c["reference_vs_fp32"], c
    assert "precision" not in report.dense  # the dense model they are measured against: fp32
    # the methods start from the unpruned int8 model, measured and checked like a candidate
    assert report.start["precision"] == "int8" and report.start["correct"]
    assert report.start["ratios"] and "unpruned int8" in report.summary()
    # its quality is the int8 model's, not the fp32 pruned model's
    from vitsparse.data.sources import load_images
    from vitsparse.plan import PruningPlan
    from vitsparse.pruning.evaluate import evaluate

    held_out = load_images("digits", image_size=digits.patch_embed.img_size[0], limit=64)
    fp32 = evaluate(digits, held_out, PruningPlan.load(out / "plan.json"))
    assert report.chosen["mean_kl"] != pytest.approx(fp32.mean_kl, rel=1e-6)  # fp32: equal
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    with pytest.raises(SearchError, match="another precision"):
        search(MODEL, precision="fp32", **common)
    journal = out / JOURNAL
    header, *rest = [json.loads(line) for line in journal.read_text().splitlines()]
    assert header["kind"] == "header" and header["precision"] == "int8"
    del header["precision"]  # a journal from before precisions: it was an fp32 search
    journal.write_text("".join(json.dumps(e) + "\n" for e in (header, *rest)))
    with pytest.raises(SearchError, match="another precision .*'fp32'"):
        search(MODEL, precision="int8", **common)
