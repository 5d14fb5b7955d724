"""The structural part of a PruningPlan (format version 2): what whole structures a model loses.

Per transformer block: the kept attention heads, optionally the kept query/key and value
dimensions (one set per block, shared by its heads, as NViT prunes them), the kept MLP neurons,
and a token keep count with its scoring rule. For the whole model: one kept set of embedding
channels. Every set is given as sorted, distinct indices into the original structure, with the
original size, so a plan can be checked without the model.

JSON (the ``"structure"`` field of a version-2 plan)::

    "structure": {
      "embed": {"size": 384, "kept": [0, 1, 5, ...]} | null,
      "blocks": {
        "0": {
          "heads": {"size": 6, "kept": [0, 2, 5]} | null,
          "qk_dims": {"size": 64, "kept": [...]} | null,
          "v_dims": {"size": 64, "kept": [...]} | null,
          "mlp": {"size": 1536, "kept": [...]} | null,
          "tokens": {"keep": 138, "rule": "cls_attention"} | null
        }, ...
      }
    }

Token pruning (EViT's placement): after block ``b``'s attention (and its residual add), only the
``keep`` highest-scoring patch tokens go on, in their original order; the class and distillation
tokens always stay, and a dropped token never returns (``keep`` counts patch tokens and cannot
exceed what is left). Rules:

- ``cls_attention`` (EViT): the class token's attention to each patch token, averaged over heads.
- ``cumulative_attention`` (CP-ViT): per block, the strongest attention any query pays to the
  patch token, summed over heads; accumulated over this and every earlier block (the sum follows
  the surviving tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vitsparse.errors import PlanError

TOKEN_RULES = ("cls_attention", "cumulative_attention")
_SET_FIELDS = ("size", "kept")
_BLOCK_FIELDS = ("heads", "qk_dims", "v_dims", "mlp", "tokens")
_TOKEN_FIELDS = ("keep", "rule")
_STRUCTURE_FIELDS = ("embed", "blocks")


@dataclass(frozen=True)
class IndexSet:
    """The kept members (sorted, distinct indices) of a structure of ``size`` members."""

    size: int
    kept: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "kept", tuple(self.kept))

    def check(self, where: str) -> None:
        if type(self.size) is not int or self.size < 1:
            raise PlanError(f"{where}: size must be a positive integer, got {self.size!r}")
        if not self.kept:
            raise PlanError(f"{where}: keeps nothing; at least one of {self.size} must stay")
        if any(type(i) is not int for i in self.kept):
            raise PlanError(f"{where}: kept indices must be integers, got {list(self.kept)!r}")
        bad = [i for i in self.kept if not 0 <= i < self.size]
        if bad:
            raise PlanError(
                f"{where}: kept indices {bad} are out of range for a size of {self.size} "
                f"(0..{self.size - 1})"
            )
        if list(self.kept) != sorted(set(self.kept)):
            raise PlanError(f"{where}: kept indices must be sorted and distinct")

    @property
    def fraction(self) -> float:
        return len(self.kept) / self.size

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "kept": list(self.kept)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexSet:
        _check_object(data, _SET_FIELDS, where)
        if not isinstance(data["kept"], list):
            raise PlanError(f"{where}: 'kept' must be a list of indices")
        out = cls(data["size"], tuple(data["kept"]))
        out.check(where)
        return out


@dataclass(frozen=True)
class TokenKeep:
    """Keep ``keep`` patch tokens after this block's attention, chosen by ``rule``."""

    keep: int
    rule: str = "cls_attention"

    def check(self, where: str) -> None:
        if type(self.keep) is not int or self.keep < 1:
            raise PlanError(
                f"{where}: token keep count must be a positive integer, got {self.keep!r}"
            )
        if self.rule not in TOKEN_RULES:
            raise PlanError(
                f"{where}: token rule {self.rule!r} is not one of {', '.join(TOKEN_RULES)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"keep": self.keep, "rule": self.rule}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TokenKeep:
        _check_object(data, _TOKEN_FIELDS, where)
        out = cls(data["keep"], data["rule"])
        out.check(where)
        return out


@dataclass(frozen=True)
class BlockStructure:
    """What one transformer block keeps; None leaves that structure whole."""

    heads: IndexSet | None = None
    qk_dims: IndexSet | None = None
    v_dims: IndexSet | None = None
    mlp: IndexSet | None = None
    tokens: TokenKeep | None = None

    def check(self, where: str) -> None:
        for name in _BLOCK_FIELDS:
            value = getattr(self, name)
            if value is not None:
                value.check(f"{where}, {name}")

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in _BLOCK_FIELDS)

    def to_json(self) -> dict[str, Any]:
        return {
            name: (None if getattr(self, name) is None else getattr(self, name).to_json())
            for name in _BLOCK_FIELDS
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> BlockStructure:
        _check_object(data, _BLOCK_FIELDS, where)
        sets = {
            name: None if data[name] is None else IndexSet.from_json(data[name], f"{where}, {name}")
            for name in ("heads", "qk_dims", "v_dims", "mlp")
        }
        tokens = data["tokens"]
        return cls(
            **sets,
            tokens=None if tokens is None else TokenKeep.from_json(tokens, f"{where}, tokens"),
        )


@dataclass(frozen=True)
class Structure:
    """The structural pruning of a whole model: kept embedding channels and per-block sets."""

    embed: IndexSet | None = None
    blocks: Mapping[int, BlockStructure] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "blocks", MappingProxyType(dict(sorted(self.blocks.items()))))
        self.check()

    def check(self) -> None:
        if self.embed is not None:
            self.embed.check("structure, embed")
        for index, block in self.blocks.items():
            if type(index) is not int or index < 0:
                raise PlanError(f"structure: block index {index!r} is not a non-negative integer")
            if not isinstance(block, BlockStructure):
                raise PlanError(f"structure, block {index}: expected a BlockStructure")
            block.check(f"structure, block {index}")

    @property
    def empty(self) -> bool:
        return self.embed is None and all(b.empty for b in self.blocks.values())

    def block(self, index: int) -> BlockStructure:
        """Block ``index``'s structure (an empty one when the plan leaves it whole)."""
        return self.blocks.get(index, BlockStructure())

    def token_schedule(self, num_patches: int, depth: int) -> list[int]:
        """Patch tokens entering each block (length depth + 1: the last is what leaves)."""
        counts = [num_patches]
        for index in range(depth):
            tokens = self.block(index).tokens
            counts.append(counts[-1] if tokens is None else tokens.keep)
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "embed": None if self.embed is None else self.embed.to_json(),
            "blocks": {str(i): b.to_json() for i, b in self.blocks.items() if not b.empty},
        }

    @classmethod
    def from_json(cls, data: Any) -> Structure:
        _check_object(data, _STRUCTURE_FIELDS, "structure")
        blocks = data["blocks"]
        if not isinstance(blocks, Mapping):
            raise PlanError("structure: 'blocks' must be an object keyed by block index")
        parsed = {}
        for key, value in blocks.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise PlanError(f"structure: block key {key!r} is not a block index")
            parsed[int(key)] = BlockStructure.from_json(value, f"structure, block {key}")
        embed = data["embed"]
        return cls(
            embed=None if embed is None else IndexSet.from_json(embed, "structure, embed"),
            blocks=parsed,
        )


@dataclass(frozen=True)
class ViTGeometry:
    """The facts about a ViT that structure checks need (from the torch model or a ViTGraph)."""

    embed_dim: int
    num_heads: Sequence[int]
    head_dim: Sequence[int]
    mlp_dim: Sequence[int]
    num_patches: int
    num_prefix_tokens: int

    @property
    def depth(self) -> int:
        return len(self.num_heads)


def check_against(structure: Structure, geo: ViTGeometry, model_id: str) -> None:
    """Raise PlanError unless ``structure`` fits a model of geometry ``geo``."""
    if structure.embed is not None and structure.embed.size != geo.embed_dim:
        raise PlanError(
            f"structure, embed: plan is for {structure.embed.size} channels, model "
            f"{model_id!r} has {geo.embed_dim}"
        )
    for index, block in structure.blocks.items():
        where = f"structure, block {index}"
        if index >= geo.depth:
            raise PlanError(
                f"{where}: model {model_id!r} has {geo.depth} blocks (0..{geo.depth - 1})"
            )
        for name, actual in (
            ("heads", geo.num_heads[index]),
            ("qk_dims", geo.head_dim[index]),
            ("v_dims", geo.head_dim[index]),
            ("mlp", geo.mlp_dim[index]),
        ):
            kept = getattr(block, name)
            if kept is not None and kept.size != actual:
                raise PlanError(
                    f"{where}, {name}: plan is for {kept.size}, model {model_id!r} has {actual}"
                )
    available = geo.num_patches
    for index in range(geo.depth):
        tokens = structure.block(index).tokens
        if tokens is None:
            continue
        if tokens.keep > available:
            raise PlanError(
                f"structure, block {index}, tokens: keeps {tokens.keep} patch tokens, but only "
                f"{available} reach it (a dropped token never returns)"
            )
        available = tokens.keep


def _check_object(data: Any, known: tuple[str, ...], where: str) -> None:
    if not isinstance(data, Mapping):
        raise PlanError(f"{where}: expected an object, got {type(data).__name__}")
    unknown = [k for k in data if k not in known]
    if unknown:
        raise PlanError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )
    missing = [k for k in known if k not in data]
    if missing:
        raise PlanError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
