"""vitsparse: compile pruned Vision Transformers with Apache TVM."""

__version__ = "0.1.0"
