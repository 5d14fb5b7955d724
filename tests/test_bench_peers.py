"""bench()'s peer rows on a tiny ViT: OpenVINO in float32 and at its default precision, and ONNX
Runtime's static int8 quantization, timed beside ONNX Runtime; and the rows they give when their
package is missing, their runtime fails, or the target does not run on this machine's CPU."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from vitsparse.cli.bench import runtime_list
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.bench import bench
from vitsparse.jobs.bench_report import (
    ONNXRUNTIME_INT8,
    OPENVINO,
    OPENVINO_DEFAULT,
    PEER_RUNTIMES,
    BenchReport,
)

FP32_TOLERANCE = 1e-3
INCLUDE = ("torch-eager", "onnxruntime", *PEER_RUNTIMES)


def _bench(source, **kwargs) -> BenchReport:
    options = {"threads": 2, "repeat": 2, "number": 1, "energy_seconds": 0, "progress": None}
    return bench(source, **{**options, **kwargs})


@pytest.fixture(scope="module")
def peers():
    lines: list[str] = []
    report = _bench(tiny_vit(depth=2), include=INCLUDE, progress=lines.append)
    return report, lines


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny_vit.onnx"
    torch.onnx.export(
        tiny_vit(depth=1), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True, verbose=False
    )
    return path


def test_peers_are_timed_with_the_others(peers):
    report, lines = peers
    assert [r.runtime for r in report.rows] == list(INCLUDE)
    for row in report.rows:
        assert row.status == "ok", row
        assert row.device == "cpu" and row.repeats == 2
        assert 0 < row.latency_ms["min"] <= row.latency_ms["median"] <= row.latency_ms["max"]
    timing = [line for line in lines if "alternating rounds" in line]
    assert len(timing) == 1 and all(name in timing[0] for name in PEER_RUNTIMES)
    assert BenchReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_openvino_fp32_matches_the_reference(peers):
    import openvino

    report, _ = peers
    row = report.row(OPENVINO)
    assert row.max_abs_err_vs_torch < FP32_TOLERANCE
    assert f"openvino {openvino.__version__.split('-')[0]} CPU plugin" in row.detail
    assert "inference precision f32 (set," in row.detail
    assert "PERFORMANCE_HINT LATENCY, 2 threads" in row.detail
    assert "dynamo exporter" in row.detail  # the ONNX file the onnxruntime row runs


def test_openvino_default_names_the_precision_it_used(peers):
    import openvino

    report, _ = peers
    row = report.row(OPENVINO_DEFAULT)
    # the plugin's default on this CPU, asked of the plugin (f32 here; bf16 or f16 on others)
    used = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    assert f"inference precision {used} (OpenVINO's default on this CPU" in row.detail
    assert math.isfinite(row.max_abs_err_vs_torch)
    if used == "f32":
        assert row.max_abs_err_vs_torch < FP32_TOLERANCE


def test_int8_row_reports_its_error(peers):
    report, _ = peers
    row = report.row(ONNXRUNTIME_INT8)
    err = row.max_abs_err_vs_torch
    assert math.isfinite(err) and err > 0  # int8 rounding: never exact
    assert "quantize_static" in row.detail and "per-channel" in row.detail
    assert "calibration on the bench input and 3 standard-normal draws" in row.detail
    assert f"{err:.1e}" in report.table()
    assert "tvm-dense" not in report.table()  # no TVM row: no speedups asked for


def test_peers_run_the_source_onnx_file(tiny_onnx):
    report = _bench(tiny_onnx, include=("onnxruntime", OPENVINO, ONNXRUNTIME_INT8))
    assert report.reference == "onnxruntime"
    for row in report.rows:
        assert row.status == "ok", row
    assert report.row(OPENVINO).max_abs_err_vs_torch < FP32_TOLERANCE
    assert "the source ONNX file" in report.row(ONNXRUNTIME_INT8).detail


@pytest.mark.parametrize(
    ("module", "runtime", "package"),
    [
        ("openvino", OPENVINO, "openvino"),
        ("openvino", OPENVINO_DEFAULT, "openvino"),
        ("onnxruntime.quantization", ONNXRUNTIME_INT8, "onnxruntime"),
    ],
)
def test_missing_package_gives_a_row_with_the_reason(monkeypatch, module, runtime, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    report = _bench(tiny_vit(depth=1), include=("torch-eager", runtime))
    row = report.row(runtime)
    assert row.status.startswith(f"not run: {package} cannot be imported")
    assert f"pip install {package}" in row.status
    assert row.latency_ms is None and row.max_abs_err_vs_torch is None
    assert report.row("torch-eager").status == "ok"


def test_a_failing_runtime_gives_a_row_with_the_reason(monkeypatch, tiny_onnx):
    import openvino
    from onnxruntime import quantization

    class BrokenCore:
        def compile_model(self, *args, **kwargs):
            raise RuntimeError("no plugin for this model\nsecond line")

    def broken_quantize(*args, **kwargs):
        raise ValueError("cannot calibrate")

    monkeypatch.setattr(openvino, "Core", BrokenCore)
    monkeypatch.setattr(quantization, "quantize_static", broken_quantize)
    report = _bench(tiny_onnx, include=(OPENVINO, ONNXRUNTIME_INT8))
    assert report.row(OPENVINO).status == (
        "not run: OpenVINO failed: RuntimeError: no plugin for this model"
    )
    assert report.row(ONNXRUNTIME_INT8).status == (
        "not run: ONNX Runtime int8 quantization failed: ValueError: cannot calibrate"
    )


def test_peers_do_not_run_beside_a_target_of_another_machine():
    report = _bench(tiny_vit(depth=1), target="arm", include=PEER_RUNTIMES)
    for row in report.rows:
        assert row.status.startswith("not run: a peer of the TVM build on this CPU; target arm-")
        assert row.status.endswith("does not run on this machine's CPU")


def test_cli_accepts_the_peer_names():
    assert runtime_list("onnxruntime,openvino,openvino-default,onnxruntime-int8") == (
        "onnxruntime",
        *PEER_RUNTIMES,
    )


def test_peers_do_not_run_beside_an_rpc_device():
    from types import SimpleNamespace

    from vitsparse.jobs.bench_peers import peer_skipped as _peer_skipped
    from vitsparse.targets import resolve_target

    local = SimpleNamespace(spec=resolve_target("x86"), rpc=None)
    assert _peer_skipped(local, OPENVINO) is None
    remote = SimpleNamespace(spec=local.spec, rpc=SimpleNamespace(key="rasp4"))
    row = _peer_skipped(remote, OPENVINO)
    assert row.status.startswith("not run: a peer of the TVM build on this CPU; ")
    assert row.status.endswith("the TVM rows run on a 'rasp4' device over RPC")
