"""Errors vitsparse raises for bad input. The CLI turns any of them into a one-line message
and exit status 2; each message names the thing that is wrong."""


class VitsparseError(Exception):
    """Base class of every user-facing vitsparse error."""


class ModelError(VitsparseError):
    """A model cannot be loaded: unknown name, missing or unreadable file, weights unavailable."""


class NotAViTError(ModelError):
    """The model loaded, but it is not a Vision Transformer vitsparse can map."""


class UnsupportedOpError(ModelError):
    """The importer lacks an operator the model uses."""


class TargetError(VitsparseError):
    """Unknown target preset, malformed target dict, or a toolchain missing for it."""


class DatabaseError(VitsparseError):
    """A tuning database that cannot be read or written."""


class ArtifactError(VitsparseError):
    """A compiled artifact directory that is missing or incomplete."""


class PlanError(VitsparseError):
    """A pruning plan, or a request to make one, that is invalid or does not fit the model."""


class DataError(VitsparseError):
    """Calibration or evaluation data that cannot be used (missing, empty, wrong shape)."""


class TrainingError(VitsparseError):
    """A fine-tuning job that cannot run as asked: its budget, options or output directory."""


class SearchError(VitsparseError):
    """A search that cannot meet its budget, or whose journal belongs to another search."""
