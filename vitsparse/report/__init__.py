"""Reports: side-by-side latency of a ViT under PyTorch, ONNX Runtime and TVM."""

from vitsparse.report.compare import (
    DEFAULT_RUNTIMES,
    KNOWN_RUNTIMES,
    BenchReport,
    BenchRow,
    bench,
    host_info,
    write_text_atomic,
)

__all__ = [
    "DEFAULT_RUNTIMES",
    "KNOWN_RUNTIMES",
    "BenchReport",
    "BenchRow",
    "bench",
    "host_info",
    "write_text_atomic",
]
