"""PruningPlan: the one contract between deciding what to prune and compiling it.

A plan names the model and the weights it was computed for, the method and budget that made it,
and, per linear layer, a block mask: the weight ``(out, in)`` is cut into ``rows x cols`` blocks
and a boolean bitmap of shape ``(out // rows, in // cols)`` says which blocks are kept. Layer names
are PyTorch module names (``"blocks.0.attn.qkv"``, ``"blocks.3.mlp.fc2"``).

JSON format (version 2; version 1 is the same without ``"structure"``)::

    {
      "format": "vitsparse-pruning-plan",
      "version": 2,
      "model_id": "deit_tiny_patch16_224",
      "weights_hash": "sha256:<64 hex digits>",        # see plan.reference.weights_hash
      "method": "magnitude",
      "budget": {"blocks": "32x32", "keep": 0.5, "layers": ["blocks.*.attn.qkv", ...], "seed": 0},
      "predicted_cost": null,
      "structure": null,                               # see vitsparse.plan.structure
      "layers": {
        "blocks.0.attn.qkv": {
          "rows": 32, "cols": 32, "out_features": 576, "in_features": 192,
          "kept": {"shape": [18, 6], "count": 54, "bits": "<base64>"}
        }, ...
      }
    }

``bits`` is ``base64(numpy.packbits(kept.ravel()))``: the bitmap in row-major (C) order, eight
blocks a byte, most significant bit first, the last byte padded with zero bits; ``count`` is the
number of kept blocks, checked on reading.

Versioning: a reader accepts only the versions in ``SUPPORTED_VERSIONS`` and rejects unknown fields,
so a plan is never half-understood. A change that adds fields bumps ``PLAN_VERSION`` and keeps
reading the older versions: version 2 added ``structure`` (kept heads, head dimensions, MLP
neurons, embedding channels and token counts; `vitsparse.plan.structure`). A block mask applies to
the weight as the structure leaves it (the sliced weight when the layer is also sliced).

Validation lives in this package only: the structural checks (``check_block_geometry`` and the
bitmap checks, here) run whenever a plan is built or read; ``validate_plan``
(`vitsparse.plan.reference`) adds the checks against a model (layer exists, is an ``nn.Linear``
of the right shape, weights hash). A layer whose mask keeps
no block is legal (its output is its bias alone); the pruners in ``vitsparse.pruning`` always keep
at least one block per layer, so such a layer only comes from a hand-made plan.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from vitsparse._io import write_text_atomic
from vitsparse.errors import PlanError
from vitsparse.plan.structure import Structure

PLAN_FORMAT = "vitsparse-pruning-plan"
PLAN_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
# Block sizes the block-sparse kernels handle, for rows and for cols independently.
BLOCK_SIZES = (8, 16, 32, 64)

_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
# "ROWSxCOLS", e.g. "32x32": the one spelling of a block size (specs that hold one embed it).
BLOCK_SIZE_PATTERN = r"\s*(\d+)\s*[xX]\s*(\d+)\s*"
_BLOCK_SIZE_RE = re.compile(BLOCK_SIZE_PATTERN)
_PLAN_FIELDS = (
    "format",
    "version",
    "model_id",
    "weights_hash",
    "method",
    "budget",
    "predicted_cost",
    "layers",
)
_PLAN_FIELDS_V2 = (*_PLAN_FIELDS, "structure")
_MASK_FIELDS = ("rows", "cols", "out_features", "in_features", "kept")
_BITMAP_FIELDS = ("shape", "count", "bits")


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which ``rows x cols`` blocks of one linear weight ``(out_features, in_features)`` are kept.

    Attributes
    ----------
    rows, cols
        Block size: rows of the weight (output features) by columns (input features).
    out_features, in_features
        Shape of the weight, PyTorch layout ``(out, in)``.
    kept
        Read-only boolean array of shape ``(out_features // rows, in_features // cols)``;
        ``kept[i, j]`` keeps ``weight[i*rows:(i+1)*rows, j*cols:(j+1)*cols]``.
    """

    rows: int
    cols: int
    out_features: int
    in_features: int
    kept: np.ndarray

    def __post_init__(self):
        kept = np.array(self.kept, dtype=bool, copy=True)
        kept.setflags(write=False)
        object.__setattr__(self, "kept", kept)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockMask):
            return NotImplemented
        return (
            (self.rows, self.cols, self.out_features, self.in_features)
            == (other.rows, other.cols, other.out_features, other.in_features)
            and self.kept.shape == other.kept.shape
            and bool(np.array_equal(self.kept, other.kept))
        )

    __hash__ = None  # holds an array

    @property
    def block(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return (self.rows, self.cols)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return (self.out_features, self.in_features)

    @property
    def n_blocks(self) -> int:
        """Number of blocks in the weight."""
        return int(self.kept.size)

    @property
    def n_kept(self) -> int:
        """Number of kept blocks."""
        return int(np.count_nonzero(self.kept))

    @property
    def density(self) -> float:
        """Kept fraction of the blocks (equal to the kept fraction of the weight's elements and
        of the layer's multiply-adds, since every block has the same size)."""
        return self.n_kept / self.n_blocks if self.n_blocks else 0.0

    def element_mask(self) -> np.ndarray:
        """Boolean ``(out_features, in_features)`` array: True where the weight is kept."""
        return np.repeat(np.repeat(self.kept, self.rows, axis=0), self.cols, axis=1)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (see the module docstring for the bitmap encoding)."""
        bits = np.packbits(self.kept.ravel(order="C"), bitorder="big")
        return {
            "rows": self.rows,
            "cols": self.cols,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "kept": {
                "shape": list(self.kept.shape),
                "count": self.n_kept,
                "bits": base64.b64encode(bits.tobytes()).decode("ascii"),
            },
        }


@dataclass(frozen=True, kw_only=True)
class PruningPlan:
    """What to prune in one model, decided for one set of weights.

    Attributes
    ----------
    version
        Format version (``PLAN_VERSION`` when built by this vitsparse).
    model_id
        The model the plan was made for (timm name or module class name).
    weights_hash
        ``weights_hash(model)`` of the weights the plan was computed for.
    method
        The criterion that made the plan (``"magnitude"``, ``"random"``, ...).
    budget
        The budget as asked for, JSON-ready (e.g. ``{"blocks": "32x32", "keep": 0.5, ...}``).
    predicted_cost
        The cost the plan was predicted to have (from a cost table), or None.
    layers
        Layer (torch module) name -> its block mask, read-only, in the order given.
    structure
        The structural pruning (heads, MLP neurons, embedding channels, tokens), or None.
    weights_seed
        The seed of timm's random initialisation the weights came from (``--weights-seed``),
        or None (a checkpoint, pretrained weights, a module, the built-in model). Optional in
        the file: written only when set.

    Building a plan runs the structural checks; a problem raises PlanError naming the layer.
    """

    version: int = PLAN_VERSION
    model_id: str
    weights_hash: str
    method: str
    budget: Mapping[str, Any] = field(default_factory=dict)
    predicted_cost: Mapping[str, Any] | None = None
    layers: Mapping[str, BlockMask] = field(default_factory=dict)
    structure: Structure | None = None
    weights_seed: int | None = None

    def __post_init__(self):
        _check_plan(self)
        object.__setattr__(self, "budget", copy.deepcopy(dict(self.budget)))
        if self.predicted_cost is not None:
            object.__setattr__(self, "predicted_cost", copy.deepcopy(dict(self.predicted_cost)))
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    __hash__ = None  # holds dicts and arrays

    @property
    def mean_density(self) -> float:
        """Unweighted mean of the layers' block densities (1.0 for a plan without layers)."""
        if not self.layers:
            return 1.0
        return sum(m.density for m in self.layers.values()) / len(self.layers)

    @property
    def kept_mac_fraction(self) -> float:
        """Kept fraction of the masked layers' multiply-adds: each layer weighted by
        ``out_features * in_features`` (the transformer-block linear layers all run once per
        token, so this is also their kept FLOP fraction). 1.0 for a plan without layers."""
        total = sum(m.out_features * m.in_features for m in self.layers.values())
        if total == 0:
            return 1.0
        kept = sum(m.out_features * m.in_features * m.density for m in self.layers.values())
        return kept / total

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict in the format of the module docstring."""
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "model_id": self.model_id,
            "weights_hash": self.weights_hash,
            "method": self.method,
            "budget": copy.deepcopy(dict(self.budget)),
            "predicted_cost": (
                None if self.predicted_cost is None else copy.deepcopy(dict(self.predicted_cost))
            ),
            "layers": {name: mask.to_json() for name, mask in self.layers.items()},
            **(
                {}
                if self.version < 2
                else {"structure": None if self.structure is None else self.structure.to_json()}
            ),
            **({} if self.weights_seed is None else {"weights_seed": self.weights_seed}),
        }

    def digest(self) -> str:
        """sha256 (hex) of the plan's JSON: two plans with the same digest are the same plan."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_json(cls, data: Any) -> PruningPlan:
        """Read a plan from its JSON dict; raises PlanError naming the field or layer at fault."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a pruning plan is a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"not a vitsparse pruning plan: field 'format' is {data.get('format')!r}, "
                f"expected {PLAN_FORMAT!r}"
            )
        version = data.get("version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise PlanError(
                f"plan version {version!r} is not supported; this vitsparse reads version(s) "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        _check_fields(
            data,
            _PLAN_FIELDS if version < 2 else _PLAN_FIELDS_V2,
            f"plan (version {version})",
            optional=() if version < 2 else ("weights_seed",),
        )
        structure = data.get("structure")
        layers = data["layers"]
        if not isinstance(layers, Mapping):
            raise PlanError(f"plan field 'layers' must be an object, got {type(layers).__name__}")
        return cls(
            version=version,
            model_id=data["model_id"],
            weights_hash=data["weights_hash"],
            method=data["method"],
            budget=data["budget"],
            predicted_cost=data["predicted_cost"],
            layers={name: _mask_from_json(name, entry) for name, entry in layers.items()},
            structure=None if structure is None else Structure.from_json(structure),
            weights_seed=data.get("weights_seed"),
        )

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON to ``path`` atomically; returns the path."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        """Read a plan written by ``save``; PlanError if the file is not a valid plan."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON: {err}") from None
        try:
            return cls.from_json(data)
        except PlanError as err:
            raise PlanError(f"plan file {str(path)!r}: {err}") from None


# --- checks ---------------------------------------------------------------------------------


def check_block_geometry(layer: str, block: tuple[int, int], weight_shape: tuple[int, int]) -> None:
    """Raise PlanError unless ``block`` is a handled size that tiles ``weight_shape`` exactly.

    Rows and cols must each be one of ``BLOCK_SIZES`` and divide ``out`` and ``in`` respectively
    (ragged edges are not supported: the kernels assume whole blocks).
    """
    rows, cols = block
    out_features, in_features = weight_shape
    for what, value in (("out_features", out_features), ("in_features", in_features)):
        if type(value) is not int or value < 1:
            raise PlanError(f"layer {layer!r}: {what} must be a positive integer, got {value!r}")
    if any(type(v) is not int for v in (rows, cols)):
        raise PlanError(f"layer {layer!r}: block size must be two integers, got {rows!r}x{cols!r}")
    if rows not in BLOCK_SIZES or cols not in BLOCK_SIZES:
        raise PlanError(
            f"layer {layer!r}: block {rows}x{cols} is not handled; rows and cols must each be one "
            f"of {', '.join(map(str, BLOCK_SIZES))}"
        )
    if out_features % rows or in_features % cols:
        raise PlanError(
            f"layer {layer!r}: block {rows}x{cols} does not divide its weight of shape "
            f"({out_features}, {in_features}) (out, in); choose a block whose rows divide "
            f"{out_features} and whose cols divide {in_features}"
        )


def _check_plan(plan: PruningPlan) -> None:
    if type(plan.version) is not int or plan.version not in SUPPORTED_VERSIONS:
        raise PlanError(
            f"plan version {plan.version!r} is not supported; this vitsparse reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    for name in ("model_id", "method"):
        value = getattr(plan, name)
        if not isinstance(value, str) or not value:
            raise PlanError(f"plan field {name!r} must be a non-empty string, got {value!r}")
    if not isinstance(plan.weights_hash, str) or not _HASH_RE.fullmatch(plan.weights_hash):
        raise PlanError(
            f"plan field 'weights_hash' must be 'sha256:' and 64 lowercase hex digits, "
            f"got {plan.weights_hash!r}"
        )
    if plan.weights_seed is not None and type(plan.weights_seed) is not int:
        raise PlanError(f"plan field 'weights_seed' must be an integer, got {plan.weights_seed!r}")
    if not isinstance(plan.budget, Mapping):
        raise PlanError(f"plan field 'budget' must be an object, got {plan.budget!r}")
    if plan.predicted_cost is not None and not isinstance(plan.predicted_cost, Mapping):
        raise PlanError(
            f"plan field 'predicted_cost' must be an object or null, got {plan.predicted_cost!r}"
        )
    if plan.structure is not None:
        if plan.version < 2:
            raise PlanError("plan version 1 cannot hold a structure; use version 2")
        if not isinstance(plan.structure, Structure):
            raise PlanError(f"plan field 'structure' must be a Structure, got {plan.structure!r}")
    if not isinstance(plan.layers, Mapping):
        raise PlanError(f"plan field 'layers' must be a mapping, got {type(plan.layers).__name__}")
    for name, mask in plan.layers.items():
        if not isinstance(name, str) or not name:
            raise PlanError(f"plan layer names must be non-empty strings, got {name!r}")
        if not isinstance(mask, BlockMask):
            raise PlanError(f"layer {name!r}: expected a BlockMask, got {type(mask).__name__}")
        check_block_geometry(name, mask.block, mask.weight_shape)
        grid = (mask.out_features // mask.rows, mask.in_features // mask.cols)
        if mask.kept.shape != grid:
            raise PlanError(
                f"layer {name!r}: block bitmap has shape {mask.kept.shape}, but a "
                f"({mask.out_features}, {mask.in_features}) weight in {mask.rows}x{mask.cols} "
                f"blocks needs {grid}"
            )


def _check_fields(
    data: Mapping, known: Iterable[str], what: str, optional: Iterable[str] = ()
) -> None:
    known, optional = tuple(known), tuple(optional)
    unknown = [k for k in data if k not in known + optional]
    if unknown:
        raise PlanError(
            f"{what}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"known fields: {', '.join(known + optional)}"
        )
    missing = [k for k in known if k not in data]
    if missing:
        raise PlanError(f"{what}: missing field(s) {', '.join(map(repr, missing))}")


def _mask_from_json(name: str, entry: Any) -> BlockMask:
    where = f"layer {name!r}"
    if not isinstance(entry, Mapping):
        raise PlanError(f"{where}: expected an object, got {type(entry).__name__}")
    _check_fields(entry, _MASK_FIELDS, where)
    bitmap = entry["kept"]
    if not isinstance(bitmap, Mapping):
        raise PlanError(f"{where}: field 'kept' must be an object, got {type(bitmap).__name__}")
    _check_fields(bitmap, _BITMAP_FIELDS, f"{where}, field 'kept'")
    shape = bitmap["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or any(type(v) is not int or v < 0 for v in shape)
    ):
        raise PlanError(f"{where}: bitmap shape must be two non-negative integers, got {shape!r}")
    n = shape[0] * shape[1]
    try:
        raw = base64.b64decode(bitmap["bits"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise PlanError(f"{where}: bitmap 'bits' is not valid base64") from None
    if len(raw) != math.ceil(n / 8):
        raise PlanError(
            f"{where}: bitmap holds {len(raw)} byte(s), but shape {tuple(shape)} needs "
            f"{math.ceil(n / 8)} ({n} blocks, 8 a byte)"
        )
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="big")
    if bits[n:].any():
        raise PlanError(f"{where}: bitmap has bits set beyond its {n} blocks")
    kept = bits[:n].astype(bool).reshape(shape)
    if bitmap["count"] != int(kept.sum()):
        raise PlanError(
            f"{where}: bitmap keeps {int(kept.sum())} block(s) but 'count' says "
            f"{bitmap['count']!r}; the bitmap is corrupt"
        )
    return BlockMask(
        rows=entry["rows"],
        cols=entry["cols"],
        out_features=entry["out_features"],
        in_features=entry["in_features"],
        kept=kept,
    )


def parse_block_size(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"ROWSxCOLS"`` (e.g. ``"32x32"``) -> ``(rows, cols)``; a tuple is returned as it is.
    Only the syntax is checked (ValueError); `check_block_geometry` checks the sizes."""
    if isinstance(text, tuple):
        return text
    match = _BLOCK_SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a block size ROWSxCOLS, e.g. 16x16")
    return int(match.group(1)), int(match.group(2))


def load_plan(plan: PruningPlan | str | Path | None) -> PruningPlan | None:
    """``plan`` as a PruningPlan: read (and checked) from its JSON file when it is a path."""
    if plan is None or isinstance(plan, PruningPlan):
        return plan
    return PruningPlan.load(plan)
