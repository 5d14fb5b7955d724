"""The peers of a TVM build on this machine's CPU, on ONNX Runtime's ONNX file (the session's):
OpenVINO (float32, and at its default precision, read back from the compiled model) and ONNX
Runtime's own static int8 quantization. Each is a `Contender` of the bench's alternating rounds,
or a row saying why it did not run."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import onnx

from vitsparse._versions import version_of
from vitsparse.jobs.bench_report import (
    ONNXRUNTIME_INT8,
    OPENVINO,
    OPENVINO_DEFAULT,
    BenchRow,
)
from vitsparse.jobs.bench_session import Contender, Session, ort_runner
from vitsparse.targets import detect_host

# The int8 row's calibration: the bench's input and this many standard-normal draws of its shape.
CALIBRATION_DRAWS = 3
CALIBRATION_SEED = 1000  # the draws' seeds: CALIBRATION_SEED, CALIBRATION_SEED + 1, ...
_QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")  # LayerNorm, Softmax, GELU stay in float32
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_OV_NOT_LAYERS = frozenset({"Const", "Input", "Output", "Parameter", "Result"})


def run_openvino(session: Session) -> BenchRow | Contender:
    return _openvino(session, OPENVINO, precision="f32")


def run_openvino_default(session: Session) -> BenchRow | Contender:
    return _openvino(session, OPENVINO_DEFAULT, precision=None)


def run_onnxruntime_int8(session: Session) -> BenchRow | Contender:
    skipped = peer_skipped(session, ONNXRUNTIME_INT8)
    if skipped is not None:
        return skipped
    try:
        import onnxruntime.quantization as quantization
    except ImportError as err:
        return _not_installed(ONNXRUNTIME_INT8, "onnxruntime", err)
    path, made_from = session.onnx_file()
    session.say(f"[bench] quantizing {session.imported.model_id} to int8 (ONNX Runtime) ...")
    start = time.perf_counter()
    try:
        quantized, how = _quantize_int8(session, path, quantization)
        run = ort_runner(session, quantized)
        out = run()
    except Exception as err:  # quantization and session creation raise many types
        return BenchRow.not_run(
            ONNXRUNTIME_INT8, "cpu", f"ONNX Runtime int8 quantization failed: {_reason(err)}"
        )
    detail = (
        f"onnxruntime {version_of('onnxruntime')} CPUExecutionProvider on {made_from}, "
        f"quantized by onnxruntime.quantization.quantize_static in "
        f"{time.perf_counter() - start:.1f} s ({how}); its error is int8 rounding"
    )
    return Contender(
        ONNXRUNTIME_INT8,
        run,
        lambda latency: session.ok_row(ONNXRUNTIME_INT8, out, latency, detail=detail, run=run),
    )


def _openvino(session: Session, runtime: str, *, precision: str | None) -> BenchRow | Contender:
    """OpenVINO's CPU plugin on the session's ONNX file, with ``session.threads`` threads and
    the LATENCY hint. ``precision`` sets INFERENCE_PRECISION_HINT; None leaves the plugin's
    default, which the row's detail names as read back from the compiled model."""
    skipped = peer_skipped(session, runtime)
    if skipped is not None:
        return skipped
    try:
        import openvino
    except ImportError as err:
        return _not_installed(runtime, "openvino", err)
    path, made_from = session.onnx_file()
    session.say(f"[bench] compiling {session.imported.model_id} with OpenVINO ({runtime}) ...")
    config: dict[str, object] = {
        "INFERENCE_NUM_THREADS": session.threads,
        "PERFORMANCE_HINT": "LATENCY",
    }
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    start = time.perf_counter()
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
        seconds = time.perf_counter() - start
        request = compiled.create_infer_request()
        feed = {0: session.x}

        def call():
            return request.infer(feed, share_inputs=True)

        out = np.array(call()[compiled.output(0)])
        used = _ov_text(compiled.get_property("INFERENCE_PRECISION_HINT"))
        streams = compiled.get_property("NUM_STREAMS")
        threads = compiled.get_property("INFERENCE_NUM_THREADS")
        layers = _ov_layer_precisions(compiled)
    except Exception as err:  # OpenVINO raises RuntimeError and its own types
        return BenchRow.not_run(runtime, "cpu", f"OpenVINO failed: {_reason(err)}")
    how = "set" if precision is not None else "OpenVINO's default on this CPU"
    detail = (
        f"openvino {version_of('openvino')} CPU plugin on {made_from}; inference precision "
        f"{used} ({how}, read back from the compiled model; layers run in {layers}); "
        f"PERFORMANCE_HINT LATENCY, {threads} threads, {streams} stream(s); compiled in "
        f"{seconds:.1f} s"
    )

    def finish(latency):
        return session.ok_row(runtime, out, latency, detail=detail, run=call)

    return Contender(runtime, call, finish)


def peer_skipped(session: Session, runtime: str) -> BenchRow | None:
    """The row of a peer that does not run (None: it runs): a peer runs on this machine's CPU,
    so only beside a TVM build for it."""
    spec = session.spec
    if session.rpc is not None:
        where = f"the TVM rows run on a {session.rpc.key!r} device over RPC"
    elif spec.device_type != "cpu" or not spec.runs_locally:
        where = f"target {spec.key} does not run on this machine's CPU"
    else:
        return None
    return BenchRow.not_run(runtime, "cpu", f"a peer of the TVM build on this CPU; {where}")


def _not_installed(runtime: str, package: str, err: ImportError) -> BenchRow:
    return BenchRow.not_run(
        runtime, "cpu", f"{package} cannot be imported ({err}); `pip install {package}`"
    )


def _quantize_int8(session: Session, path: Path, quantization) -> tuple[Path, str]:
    """``path`` statically quantized to int8, calibrated on the session's input and a few
    seeded draws of its shape: (the quantized file, how it was made)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = session.tmpdir / "model.int8-prep.onnx"
    try:  # symbolic shape inference and graph optimisation, as ONNX Runtime advises
        quant_pre_process(str(path), str(prepared))
        source, prep = prepared, "after quant_pre_process"
    except Exception as err:  # its shape inference cannot take every graph
        source, prep = path, f"without pre-processing: quant_pre_process failed, {_reason(err)}"
    x = session.x
    draws = [
        np.random.default_rng(CALIBRATION_SEED + i).standard_normal(x.shape, dtype=np.float32)
        for i in range(CALIBRATION_DRAWS)
    ]
    # On x86 without VNNI the u8 x s8 dot products saturate; 7-bit weights avoid it.
    flags = detect_host().cpu_flags
    reduce_range = "avx2" in flags and not flags & _VNNI_FLAGS
    quantized = session.tmpdir / "model.int8.onnx"
    quantization.quantize_static(
        str(source),
        str(quantized),
        _CalibrationInputs(_input_name(path), [x, *draws]),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        op_types_to_quantize=list(_QUANTIZED_OPS),
        calibrate_method=quantization.CalibrationMethod.MinMax,
    )
    weights = "7-bit (reduce_range: no VNNI)" if reduce_range else "8-bit"
    how = (
        f"QDQ, {'/'.join(_QUANTIZED_OPS)} only; per-channel {weights} int8 weights, uint8 "
        f"activations; MinMax calibration on the bench input and {CALIBRATION_DRAWS} "
        f"standard-normal draws of its shape (seeds {CALIBRATION_SEED}-"
        f"{CALIBRATION_SEED + CALIBRATION_DRAWS - 1}); {prep}"
    )
    return quantized, how


class _CalibrationInputs:
    """A CalibrationDataReader (duck-typed) over a fixed list of inputs."""

    def __init__(self, name: str, inputs: list[np.ndarray]):
        self._feeds = iter([{name: x} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _input_name(path: Path) -> str:
    """The name of the ONNX file's (first) graph input that is not an initializer."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers)


def _ov_text(value) -> str:
    """An OpenVINO property as text: an element type by its short name (f32, bf16, f16)."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _ov_layer_precisions(compiled) -> str:
    """The runtime precisions of the compiled model's layers, commonest first ("f32 x62"), from
    the CPU plugin's runtime model ("unknown" where it does not say)."""
    counts: collections.Counter[str] = collections.Counter()
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()  # a key it lacks reads as ""
            precision = info["runtimePrecision"].astype(str)
            if precision and info["layerType"].astype(str) not in _OV_NOT_LAYERS:
                counts[precision] += 1
    except (KeyError, RuntimeError, TypeError):  # rt_info keys are the plugin's, not an API
        counts.clear()
    summary = ", ".join(f"{precision} x{n}" for precision, n in counts.most_common())
    return summary or "unknown precisions"


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
