"""bench(): PyTorch eager, ONNX Runtime and TVM on a tiny ViT (dense, and pruned by a plan), and
the report's JSON/markdown."""

from __future__ import annotations

import itertools
import json
import re
import time

import pytest
import torch

from vitsparse._io import write_text_atomic
from vitsparse.errors import PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.bench import DEFAULT_RUNTIMES, KNOWN_RUNTIMES, bench
from vitsparse.jobs.bench_report import PRUNED_RUNTIMES, BenchReport
from vitsparse.plan import apply_plan_to_torch
from vitsparse.pruning import block_mask_plan

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_report():
    lines: list[str] = []
    report = bench(tiny_vit(depth=2), threads=2, repeat=3, number=2, progress=lines.append)
    return report, lines


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny_vit.onnx"
    torch.onnx.export(
        tiny_vit(depth=2), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True, verbose=False
    )
    return path


def test_every_runtime_runs_and_agrees(tiny_report):
    report, _ = tiny_report
    assert [r.runtime for r in report.rows] == list(DEFAULT_RUNTIMES)
    assert report.reference == "torch-eager"
    assert report.input_shape == (1, 3, 32, 32) and report.batch == 1 and report.threads == 2
    for row in report.rows:
        assert row.status == "ok", row
        assert row.device == "cpu"
        assert row.repeats == 3
        lat = row.latency_ms
        assert 0 < lat["min"] <= lat["median"] <= lat["max"]
        assert row.max_abs_err_vs_torch < TOLERANCE
    assert report.row("torch-eager").max_abs_err_vs_torch == 0.0
    assert report.target["name"] == "x86" and report.target["runs_locally"] is True


def test_speedup_is_torch_median_over_tvm_median(tiny_report):
    report, _ = tiny_report
    torch_ms = report.row("torch-eager").median_ms
    tvm_ms = report.row("tvm-dense").median_ms
    assert report.speedup["tvm-dense vs torch-eager"] == pytest.approx(torch_ms / tvm_ms)
    assert set(report.speedup) == {"tvm-dense vs torch-eager", "tvm-dense vs onnxruntime"}


def test_progress_lines(tiny_report):
    _, lines = tiny_report
    assert all(line.startswith("[bench] ") for line in lines)
    assert any("compiling VisionTransformer for x86" in line for line in lines)
    assert any("exporting" in line and "ONNX" in line for line in lines)


def test_report_records_setup(tiny_report):
    report, _ = tiny_report
    for package in ("tvm", "torch", "onnxruntime", "vitsparse", "python"):
        assert report.versions[package]
    assert report.host["logical_cpus"] >= 1 and report.host["llvm_cpu"]
    assert report.date[:2] == "20"
    assert "dynamo" in report.row("onnxruntime").detail


def test_json_round_trip(tiny_report):
    report, _ = tiny_report
    data = json.loads(json.dumps(report.to_json()))
    assert data["rows"][2]["runtime"] == "tvm-dense"
    assert set(data["rows"][0]) >= {
        "runtime",
        "latency_ms",
        "repeats",
        "max_abs_err_vs_torch",
        "status",
    }
    assert set(data["rows"][0]["latency_ms"]) == {"median", "min", "max"}
    again = BenchReport.from_json(data)
    assert again == report
    assert again.to_json() == report.to_json()


def test_markdown_and_text_tables(tiny_report):
    report, _ = tiny_report
    markdown = report.to_markdown()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(report.rows)  # header, rule, rows
    for row in report.rows:
        assert any(line.startswith(f"| {row.runtime} |") for line in table_lines)
        assert f"{row.latency_ms['median']:.2f}" in markdown
    assert "tvm-dense vs torch-eager" in markdown
    text = report.table()
    for row in report.rows:
        assert row.runtime in text
    widths = {len(line) for line in text.splitlines()[2:4]}  # header and rule line up
    assert len(widths) == 1


def test_onnx_source_uses_onnxruntime_as_reference(tiny_onnx):
    report = bench(tiny_onnx, threads=2, repeat=2, number=1, progress=None)
    assert report.model == "tiny_vit" and report.reference == "onnxruntime"
    torch_row = report.row("torch-eager")
    assert torch_row.status.startswith("not run:") and torch_row.latency_ms is None
    assert report.row("onnxruntime").max_abs_err_vs_torch == 0.0
    assert report.row("tvm-dense").max_abs_err_vs_torch < TOLERANCE
    assert "the source ONNX file" in report.row("onnxruntime").detail
    assert set(report.speedup) == {"tvm-dense vs onnxruntime"}
    assert "measured against onnxruntime" in report.table()
    assert BenchReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_target_that_cannot_run_here_is_reported_not_run():
    report = bench(tiny_vit(depth=1), target="arm", include=("tvm-dense",), progress=None)
    (row,) = report.rows
    assert row.status.startswith("not run: target arm-aarch64-neon")
    assert row.latency_ms is None and row.max_abs_err_vs_torch is None
    assert report.speedup == {}
    assert "not run" in report.table() and "not run" in report.to_markdown()


def test_unknown_runtime_lists_the_known_ones():
    with pytest.raises(ValueError, match="known runtimes are.*torch-eager.*tvm-dense"):
        bench("deit_tiny_patch16_224", include=("torch-eager", "tvm-sparse"))


def test_write_text_atomic_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # umask, not 0600


# --- with a pruning plan -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_setup():
    model = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    plan = block_mask_plan(model, model_id="tiny_vit", block=(16, 16), keep=0.5)
    lines: list[str] = []
    report = bench(model, threads=2, repeat=2, number=1, plan=plan, progress=lines.append)
    return model, plan, report, lines


def test_plan_adds_the_pruned_rows(pruned_setup):
    model, plan, report, _ = pruned_setup
    assert [r.runtime for r in report.rows] == [*DEFAULT_RUNTIMES, *PRUNED_RUNTIMES]
    assert all(row.status == "ok" for row in report.rows)
    assert report.row("torch-pruned").max_abs_err_vs_torch == 0.0  # it is the pruned reference
    assert report.row("tvm-pruned").max_abs_err_vs_torch <= TOLERANCE
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert (apply_plan_to_torch(model, plan)(x) - model(x)).abs().max() > 1e-3


def test_pruned_rows_details_and_speedups(pruned_setup):
    _, _, report, lines = pruned_setup
    detail = report.row("tvm-pruned").detail
    assert re.search(r"\d+ layers BSR, \d+ dense \(break-even measured\)", detail), detail
    assert "error vs torch-pruned" in detail
    assert "mean density 0.500" in report.row("torch-pruned").detail
    assert set(report.speedup) == {
        "tvm-dense vs torch-eager",
        "tvm-dense vs onnxruntime",
        "tvm-pruned vs tvm-dense",
        "tvm-pruned vs torch-eager",
    }
    tvm_ms = report.row("tvm-dense").median_ms
    pruned_ms = report.row("tvm-pruned").median_ms
    assert report.speedup["tvm-pruned vs tvm-dense"] == pytest.approx(tvm_ms / pruned_ms)
    assert "measured against torch-pruned's output" in report.to_markdown()
    assert any("compiling VisionTransformer with the pruning plan" in line for line in lines)
    assert BenchReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_plan_for_other_weights_fails_before_timing(tmp_path):
    other = tiny_vit(depth=2, embed_dim=64, num_heads=4, seed=1)
    path = block_mask_plan(other, model_id="tiny_vit", block=(16, 16)).save(tmp_path / "p.json")
    lines: list[str] = []
    with pytest.raises(PlanError, match="other weights"):
        bench(tiny_vit(depth=2), plan=path, include=("tvm-pruned",), progress=lines.append)
    assert not [line for line in lines if "timing" in line or "compiling" in line]


def test_pruned_row_without_a_plan():
    with pytest.raises(ValueError, match="tvm-pruned.*need a pruning plan"):
        bench(tiny_vit(depth=1), include=("torch-eager", "tvm-pruned"), progress=None)


class _TenWatts:
    """A fake CPU meter drawing a constant 10 W (the plumbing test; real readers are in
    test_meters)."""

    name, available, reason = "fake-10W", True, ""

    def start(self):
        self.t0 = time.perf_counter()

    def joules(self):
        return 10.0 * (time.perf_counter() - self.t0)

    def stop(self):
        pass


def test_energy_columns_where_a_meter_exists(monkeypatch):
    from vitsparse.devices import meters

    monkeypatch.setitem(meters.METERS, "cpu", _TenWatts)
    report = bench(
        tiny_vit(depth=1),
        threads=2,
        repeat=2,
        number=1,
        include=("torch-eager", "tvm-dense"),
        energy_seconds=0.2,
        progress=None,
    )
    assert report.meters == {"cpu": "fake-10W"}
    for row in report.rows:
        assert row.watts == pytest.approx(10.0, rel=0.05)
        assert 0 < row.energy_j < 10.0 * 0.2  # one run's share of the window
    again = BenchReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again.row("tvm-dense").energy_j == report.row("tvm-dense").energy_j
    assert "energy mJ" in report.table() and "energy on cpu: fake-10W" in report.table()


def test_no_meter_leaves_energy_null_and_says_why(tiny_report):
    from vitsparse.devices.meters import RaplMeter

    if RaplMeter().available:
        pytest.skip("this host has RAPL")
    report, _ = tiny_report
    assert all(r.energy_j is None and r.watts is None for r in report.rows)
    assert report.meters["cpu"].startswith("unavailable: no /sys/class/powercap")
    assert report.to_json()["rows"][0]["energy_j"] is None


def test_every_runtime_has_a_runner():
    from vitsparse.jobs.bench_runtimes import RUNNERS

    assert tuple(RUNNERS) == KNOWN_RUNTIMES


def test_runtimes_take_their_samples_in_alternating_rounds_with_a_pause():
    from vitsparse.devices import Timing
    from vitsparse.jobs.bench_report import BenchRow
    from vitsparse.jobs.bench_session import QUIESCE_S, Contender, time_alternating

    calls: list[tuple[str, float]] = []

    def contender(name):
        def finish(latency):
            return BenchRow(runtime=name, device="cpu", status="ok", latency_ms=latency)

        return Contender(name, lambda: calls.append((name, time.perf_counter())), finish)

    rows = time_alternating(
        [contender("a"), contender("b")], Timing(repeat=3, number=2, warmup=1), lambda _: None
    )
    assert [r.runtime for r in rows] == ["a", "b"]
    assert all(r.latency_ms["min"] <= r.latency_ms["median"] for r in rows)
    names = "".join(name for name, _ in calls)
    assert names == "a" + "b" + "aabb" * 3  # warm-ups, then one sample each per round
    # each switch from one runtime to the next waits for the last one's pool to sleep
    switches = [t2 - t1 for (n1, t1), (n2, t2) in itertools.pairwise(calls[2:]) if n1 != n2]
    assert switches and min(switches) >= QUIESCE_S
