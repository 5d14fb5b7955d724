"""The numeric precisions vitsparse knows (which target compiles which:
`vitsparse.targets.precision`). Here, below everything, so that the CLI names them without
importing TVM."""

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DEFAULT_PRECISION = "fp32"
