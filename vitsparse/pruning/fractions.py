"""Plans by explicit fractions: which heads, MLP neurons and embedding channels a structure keeps
by a per-structure score (the magnitude (L1) baseline, or a random control), token keep counts
from a ``KEEP@BLOCKS`` spec, and the ``ROWSxCOLS:KEEP`` block spec.

Each block keeps ``floor(f * n + 0.5)`` (at least one) of its heads and of its MLP neurons; the
model keeps that many of its embedding channels. Magnitude scores are the L1 norms of every
weight a structure owns:

- a head: its q, k and v rows of qkv and its columns of proj;
- an MLP neuron: its row of fc1 and its column of fc2;
- an embedding channel: its patch-projection filter, its columns of every qkv/fc1/head and its
  rows of every proj/fc2.

Token keep counts come from a spec such as ``0.7@4,7,10``: after blocks 4, 7 and 10 (1-based),
keep 70% of the patch tokens still there (rounded, at least one).
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import torch

from vitsparse.errors import PlanError
from vitsparse.plan import (
    BLOCK_SIZE_PATTERN,
    TOKEN_RULES,
    BlockStructure,
    IndexSet,
    Structure,
    TokenKeep,
    geometry_of,
    parse_block_size,
)
from vitsparse.pruning._specs import match_number

STRUCTURE_METHODS = ("magnitude", "random")
_BLOCK_SPEC = re.compile(rf"(?P<block>{BLOCK_SIZE_PATTERN}):\s*(?P<keep>[0-9.eE+-]+)\s*")
_TOKEN_SPEC = re.compile(r"\s*([0-9.eE+-]+)\s*@\s*(\d+(?:\s*,\s*\d+)*)\s*")


def parse_block_spec(spec: str) -> tuple[tuple[int, int], float]:
    """Parse ``"ROWSxCOLS:KEEP"`` (e.g. ``"32x32:0.5"``) into ``((rows, cols), keep)``.

    Only the syntax is checked here; block sizes and ``keep`` are checked by the pruner.
    """
    error = (
        f"block spec {spec!r} is not ROWSxCOLS:KEEP (block rows x cols, then the fraction of "
        "blocks to keep), e.g. 32x32:0.5"
    )
    match, keep = match_number(_BLOCK_SPEC, spec, "keep", error)
    return parse_block_size(match.group("block")), keep


def parse_token_spec(spec: str) -> tuple[float, list[int]]:
    """``"KEEP@B1,B2,..."`` -> (keep fraction, 1-based block numbers)."""
    error = (
        f"token spec {spec!r} is not KEEP@BLOCKS (the fraction of patch tokens kept after each "
        "listed block, 1-based), e.g. 0.7@4,7,10"
    )
    match, keep = match_number(_TOKEN_SPEC, spec, 1, error)
    return keep, [int(b) for b in match.group(2).split(",")]


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise PlanError(f"{name} must be a kept fraction in (0, 1], got {value!r}")
    return float(value)


def keep_top(scores: np.ndarray, fraction: float) -> tuple[int, ...]:
    """The indices (sorted) of the ``floor(fraction * n + 0.5)`` highest scores, at least one;
    ties go to the lower index."""
    n_keep = max(1, math.floor(fraction * scores.size + 0.5))
    order = np.argsort(-scores, kind="stable")  # largest first, ties to the lower index
    return tuple(sorted(int(i) for i in order[:n_keep]))


def _abs(weight: torch.Tensor, norm: str) -> np.ndarray:
    """Elementwise |w| (L1) or w^2 (L2, square-rooted after summing) as float64."""
    w = weight.detach().to(torch.float64)
    return (w.abs() if norm == "l1" else w * w).numpy()


def magnitude_scores(model: torch.nn.Module, norm: str = "l1") -> dict:
    """The L1 or L2 norm of every weight each structure owns (see the module docstring):
    ``{"heads": [per block (H,)], "mlp": [per block (M,)], "embed": (E,)}``."""
    if norm not in ("l1", "l2"):
        raise PlanError(f"norm {norm!r} is not 'l1' or 'l2'")
    geo = geometry_of(model)
    out: dict = {"heads": [], "mlp": []}
    for i, blk in enumerate(model.blocks):
        h, d = geo.num_heads[i], geo.head_dim[i]
        qkv = _abs(blk.attn.qkv.weight, norm).reshape(3, h, d, -1).sum(axis=(0, 2, 3))
        proj = _abs(blk.attn.proj.weight, norm).reshape(-1, h, d).sum(axis=(0, 2))
        out["heads"].append(qkv + proj)
        fc1 = _abs(blk.mlp.fc1.weight, norm).sum(axis=1)
        fc2 = _abs(blk.mlp.fc2.weight, norm).sum(axis=0)
        out["mlp"].append(fc1 + fc2)
    channel = _abs(model.patch_embed.proj.weight, norm).reshape(geo.embed_dim, -1).sum(axis=1)
    for blk in model.blocks:
        channel = channel + _abs(blk.attn.qkv.weight, norm).sum(axis=0)
        channel = channel + _abs(blk.attn.proj.weight, norm).sum(axis=1)
        channel = channel + _abs(blk.mlp.fc1.weight, norm).sum(axis=0)
        channel = channel + _abs(blk.mlp.fc2.weight, norm).sum(axis=1)
    for head in (getattr(model, "head", None), getattr(model, "head_dist", None)):
        if isinstance(head, torch.nn.Linear):
            channel = channel + _abs(head.weight, norm).sum(axis=0)
    out["embed"] = channel
    if norm == "l2":
        out = {
            "heads": [np.sqrt(a) for a in out["heads"]],
            "mlp": [np.sqrt(a) for a in out["mlp"]],
            "embed": np.sqrt(out["embed"]),
        }
    return out


def structure_plan(
    model: torch.nn.Module,
    *,
    method: str = "magnitude",
    heads: float | None = None,
    mlp: float | None = None,
    embed: float | None = None,
    tokens: str | None = None,
    token_rule: str = "cls_attention",
    seed: int = 0,
) -> Structure:
    """The structure that keeps the given fractions of ``model`` (a timm ViT).

    ``heads``/``mlp``: fraction of each block's heads / MLP neurons kept; ``embed``: fraction of
    the embedding channels kept; ``tokens``: a ``KEEP@BLOCKS`` spec with ``token_rule`` as the
    scoring rule. None leaves that structure whole. ``method`` is ``"magnitude"`` or ``"random"``
    (drawn from ``numpy.random.default_rng([seed, crc32(structure name)])``).
    """
    if method not in STRUCTURE_METHODS:
        raise PlanError(
            f"unknown structural pruning method {method!r}; known: {', '.join(STRUCTURE_METHODS)}"
        )
    if token_rule not in TOKEN_RULES:
        raise PlanError(f"token rule {token_rule!r} is not one of {', '.join(TOKEN_RULES)}")
    geo = geometry_of(model)

    def scores(name: str, magnitude) -> np.ndarray:
        if method == "random":
            rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
            return rng.random(magnitude.shape)
        return magnitude

    blocks: dict[int, dict] = {i: {} for i in range(geo.depth)}
    magnitude = magnitude_scores(model) if any(v is not None for v in (heads, mlp, embed)) else {}
    for i in range(geo.depth):
        if heads is not None:
            kept = keep_top(
                scores(f"blocks.{i}.heads", magnitude["heads"][i]), _fraction("heads", heads)
            )
            blocks[i]["heads"] = IndexSet(geo.num_heads[i], kept)
        if mlp is not None:
            kept = keep_top(scores(f"blocks.{i}.mlp", magnitude["mlp"][i]), _fraction("mlp", mlp))
            blocks[i]["mlp"] = IndexSet(geo.mlp_dim[i], kept)
    if tokens is not None:
        keep, numbers = parse_token_spec(tokens)
        keep = _fraction("token keep", keep)
        bad = [b for b in numbers if not 1 <= b <= geo.depth]
        if bad or len(set(numbers)) != len(numbers):
            raise PlanError(
                f"token spec {tokens!r}: blocks must be distinct numbers in 1..{geo.depth} "
                "(1-based)"
            )
        left = geo.num_patches
        for number in sorted(numbers):
            left = max(1, math.floor(keep * left + 0.5))
            blocks[number - 1]["tokens"] = TokenKeep(left, token_rule)
    embed_set = None
    if embed is not None:
        kept = keep_top(scores("embed", magnitude["embed"]), _fraction("embed", embed))
        embed_set = IndexSet(geo.embed_dim, kept)
    return Structure(
        embed=embed_set,
        blocks={i: BlockStructure(**parts) for i, parts in blocks.items() if parts},
    )
