"""CP-ViT: cascade token (patch) and head pruning with layer-aware keep counts
(../shared/PAPERS.md, section 4).

From the dense model's attention on the calibration images:

1. **Cumulative patch scores** ``S_p``: after block ``l``, ``S_p += sum_h max_i A^l_h[i, p]``
   (the strongest attention any query pays to patch ``p``, summed over heads). At run time the
   compiled model keeps the patches with the highest ``S_p`` (the plan's ``cumulative_attention``
   token rule), so this module only decides how many.
2. **Head scores**: the attention a head pays to informative patches,
   ``sum_p (S^l_p / sum S^l) * max_i A^l_h[i, p]``, averaged over images; a block keeps its
   highest-scoring heads.
3. **Attention range** of block ``l``: the mean grid distance between each patch query and the
   patch it attends to most, over heads and images, divided by the mean distance between two
   random patches (about 1 for global attention, near 0 for local). The layer weight
   ``w_l = max(range_0..range_l) / max over layers`` rises with depth and is small where
   attention is local.
4. **Layer-aware keep counts**: block ``l`` keeps ``round((1 - a * w_l) * P)`` of the ``P`` patch
   tokens after its attention and ``round((1 - head_share * a * w_l) * H)`` heads (at least
   ``min_tokens`` and one head). ``w_l`` never falls, so counts never rise: a pruned patch or
   head stays pruned (the cascade). The one scale ``a`` is bisected until the FLOPs budget holds.

Tokens save no weights, so the budget is FLOPs only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from vitsparse._progress import ProgressBar
from vitsparse.errors import DataError, PlanError
from vitsparse.plan import (
    BlockStructure,
    IndexSet,
    PruningPlan,
    Structure,
    TokenKeep,
    apply_structure,
    geometry_of,
)
from vitsparse.pruning._hooks import hooked
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.compose import compose_plan

HEAD_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class AttentionStats:
    """What CP-ViT reads off the dense model's attention (per block)."""

    range: np.ndarray  # (depth,) attention range, ~1 global, ~0 local
    heads: list  # per block (H,) head scores

    @property
    def weights(self) -> np.ndarray:
        """``w_l``: the running maximum of the range, scaled to a maximum of 1."""
        w = np.maximum.accumulate(np.clip(self.range, 0, None))
        if w.max() <= 0:  # no range information: rise linearly with depth
            w = np.arange(1, w.size + 1, dtype=float)
        return w / w.max()


def attention_stats(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch: int = 32,
    progress: Callable[[str], None] | None = None,
) -> AttentionStats:
    """Attention ranges and head scores of ``model`` over ``images`` (see the module docstring)."""
    if len(images) == 0:
        raise DataError("the calibration set is empty")
    geo = geometry_of(model)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    if grid[0] * grid[1] != geo.num_patches:
        raise PlanError(f"cpvit needs a patch grid; {grid} does not give {geo.num_patches}")
    rows, cols = np.divmod(np.arange(geo.num_patches), grid[1])
    pos = torch.tensor(np.stack([rows, cols], 1), dtype=torch.float64)
    dist = torch.cdist(pos, pos)  # (P, P) grid distances
    mean_dist = float(dist.sum() / max(1, geo.num_patches * (geo.num_patches - 1)))
    reference = apply_structure(model, Structure())
    prefix = geo.num_prefix_tokens
    captured: list = []
    hooks = [
        (blk.attn, "forward", lambda _m, _i, out: captured.append(out[1]))
        for blk in reference.blocks
    ]
    ranges = np.zeros(geo.depth)
    heads = [np.zeros(h) for h in geo.num_heads]
    bar = ProgressBar(f"[cpvit] attention of {len(images)} images", len(images), progress)
    with hooked(hooks), torch.no_grad():
        for start in range(0, len(images), batch):
            captured.clear()
            x = images[start : start + batch]
            reference(x)
            cumulative = None
            for i, attn in enumerate(captured):
                a = attn[:, :, prefix:, prefix:].double()  # patch queries and keys
                received = a.amax(dim=2)  # (B, H, P): max over queries
                total = received.sum(dim=1)
                cumulative = total if cumulative is None else cumulative + total
                share = cumulative / cumulative.sum(dim=-1, keepdim=True)
                heads[i] += (received * share[:, None, :]).sum(dim=-1).sum(dim=0).numpy()
                target = a.argmax(dim=-1)  # (B, H, P): the patch each query attends most
                query = torch.arange(geo.num_patches).expand_as(target)
                ranges[i] += float(dist[query, target].mean(dim=(1, 2)).sum()) / mean_dist
            bar.advance(len(x))
    n = len(images)
    return AttentionStats(range=ranges / n, heads=[h / n for h in heads])


def cpvit_plan(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    budget: Budget,
    *,
    model_id: str,
    head_share: float = HEAD_SHARE,
    min_tokens: int = 1,
    stats: AttentionStats | None = None,
    batch: int = 32,
    progress: Callable[[str], None] | None = None,
) -> PruningPlan:
    """The CP-ViT token and head plan of ``model`` within ``budget`` (see the module docstring);
    ``stats``: an `attention_stats` result to reuse (one serves every budget)."""
    if budget.metric != "flops":
        raise PlanError(
            "cpvit prunes tokens, which save no weights: give a FLOPs budget (e.g. flops=0.5)"
        )
    if not 0 <= head_share <= 1:
        raise PlanError(f"cpvit head_share must be in [0, 1], got {head_share}")
    geo = geometry_of(model)
    if not 1 <= min_tokens <= geo.num_patches:
        raise PlanError(f"cpvit min_tokens must be in 1..{geo.num_patches}, got {min_tokens}")
    if stats is None:
        stats = attention_stats(model, calibration, batch=batch, progress=progress)
    weights = stats.weights
    head_order = [np.argsort(-h, kind="stable") for h in stats.heads]

    def structure_at(scale: float) -> Structure:
        blocks = {}
        tokens_before, heads_before = geo.num_patches, None
        for i in range(geo.depth):
            h = geo.num_heads[i]
            tokens = max(min_tokens, round((1 - min(1.0, scale * weights[i])) * geo.num_patches))
            tokens = min(tokens, tokens_before)
            count = max(1, round((1 - min(1.0, head_share * scale * weights[i])) * h))
            if heads_before is not None and h == geo.num_heads[i - 1]:
                count = min(count, heads_before)  # the cascade, where blocks are alike
            parts = {}
            if count < h:
                parts["heads"] = IndexSet(h, tuple(sorted(int(j) for j in head_order[i][:count])))
            if tokens < tokens_before:
                parts["tokens"] = TokenKeep(tokens, "cumulative_attention")
            if parts:
                blocks[i] = BlockStructure(**parts)
            tokens_before, heads_before = tokens, count
        return Structure(blocks=blocks)

    dense = budget.measure(model)
    lo, hi = 0.0, 1.0
    while not budget.fits(model, structure_at(hi), dense):
        if hi > 1e6:
            raise PlanError(
                f"budget flops={budget.fraction} is below what cpvit reaches (tokens down to "
                f"{min_tokens}, one head per block; head_share {head_share})"
            )
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if budget.fits(model, structure_at(mid), dense):
            hi = mid
        else:
            lo = mid
    plan = compose_plan(model, model_id=model_id, method="cpvit", structure=structure_at(hi))
    layer = [round(float(w), 4) for w in weights]
    return dataclasses.replace(
        plan,
        budget={
            **budget.to_json(),
            "scale": round(hi, 6),
            "head_share": head_share,
            "layer_weights": layer,
            **plan.budget,
        },
    )
