"""Reports: side-by-side latency of a ViT (dense or pruned) under PyTorch, ONNX Runtime and
TVM."""

from vitsparse._io import write_text_atomic
from vitsparse.report.compare import (
    DEFAULT_RUNTIMES,
    KNOWN_RUNTIMES,
    PRUNED_RUNTIMES,
    BenchReport,
    BenchRow,
    bench,
    host_info,
    sparsity_summary,
)

__all__ = [
    "DEFAULT_RUNTIMES",
    "KNOWN_RUNTIMES",
    "PRUNED_RUNTIMES",
    "BenchReport",
    "BenchRow",
    "bench",
    "host_info",
    "sparsity_summary",
    "write_text_atomic",
]
