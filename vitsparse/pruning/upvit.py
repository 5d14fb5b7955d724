"""UP-ViT: structural pruning by KL leave-one-out importance, uniform ratios
(../shared/PAPERS.md, section 3).

The importance of a channel is ``KL(p_dense || p_without_it)`` summed over the proxy images, where
``p`` is the model's softmax output. Families: MLP neurons (the neuron's activation zeroed: its
fc1 row and fc2 column gone), attention heads (UP-ViT keeps heads whole, so a head is removed as
a unit: its output zeroed before proj), and embedding channels (the channel zeroed on the
residual stream after the embedding and after every block). Every block keeps the same fraction
of its heads and of its neurons, and the model that fraction of its embedding channels, the
highest-KL ones; the fraction is bisected until the model's FLOPs meet the budget.

Cost: one forward pass over the proxy images per channel (progress is reported per family).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from vitsparse.errors import DataError, PlanError
from vitsparse.plan import PruningPlan
from vitsparse.plan_structure import BlockStructure, IndexSet, Structure
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.structured_torch import geometry_of


def _kl(dense_log: torch.Tensor, logits: torch.Tensor) -> float:
    log_q = logits.log_softmax(-1)
    return float((dense_log.exp() * (dense_log - log_q)).sum())


class _Masks:
    """Forward hooks that zero chosen channels: MLP activations, head outputs, the stream."""

    def __init__(self, model):
        self.model, self.handles = model, []
        self.mlp: dict[int, torch.Tensor] = {}
        self.heads: dict[int, torch.Tensor] = {}
        self.stream: torch.Tensor | None = None
        for i, blk in enumerate(model.blocks):
            self.handles.append(blk.mlp.act.register_forward_hook(self._mlp_hook(i)))
            self.handles.append(blk.attn.proj.register_forward_pre_hook(self._head_hook(i, blk)))
            self.handles.append(blk.register_forward_hook(self._stream_hook))
        self.handles.append(model.norm_pre.register_forward_hook(self._stream_hook))

    def _mlp_hook(self, i):
        def hook(_module, _inputs, out):
            return out if i not in self.mlp else out * self.mlp[i]

        return hook

    def _head_hook(self, i, blk):
        dim = blk.attn.head_dim

        def hook(_module, inputs):
            if i not in self.heads:
                return None
            (x,) = inputs
            return (x * self.heads[i].repeat_interleave(dim),)

        return hook

    def set_mlp(self, block: int, keep: torch.Tensor) -> None:
        self.mlp = {block: keep}

    def set_heads(self, block: int, keep: torch.Tensor) -> None:
        self.heads = {block: keep}

    def set_stream(self, keep: torch.Tensor) -> None:
        self.stream = keep

    def clear(self) -> None:
        self.mlp, self.heads, self.stream = {}, {}, None

    def _stream_hook(self, _module, _inputs, out):
        return out if self.stream is None else out * self.stream

    def close(self):
        for handle in self.handles:
            handle.remove()


def importance(
    model, images: torch.Tensor, *, progress: Callable[[str], None] | None = None
) -> dict:
    """KL leave-one-out importance: ``{"mlp": [per block (M,)], "heads": [per block (H,)],
    "embed": (E,)}`` as numpy arrays."""
    if len(images) == 0:
        raise DataError("the proxy (calibration) set is empty")
    say = progress or (lambda _msg: None)
    geo = geometry_of(model)
    model = model.eval()
    masks = _Masks(model)
    try:
        with torch.no_grad():
            dense_log = model(images).log_softmax(-1)
            out = {"mlp": [], "heads": [], "embed": None}

            def leave_one_out(size, apply):
                """KL with each of ``size`` channels zeroed in turn through ``apply(mask)``."""
                scores = np.zeros(size)
                for c in range(size):
                    keep = torch.ones(size)
                    keep[c] = 0
                    apply(keep)
                    scores[c] = _kl(dense_log, model(images))
                return scores

            for i in range(geo.depth):
                out["mlp"].append(leave_one_out(geo.mlp_dim[i], lambda k, i=i: masks.set_mlp(i, k)))
                masks.clear()
                out["heads"].append(
                    leave_one_out(geo.num_heads[i], lambda k, i=i: masks.set_heads(i, k))
                )
                masks.clear()
                say(f"[upvit] block {i + 1}/{geo.depth}: neurons and heads scored")
            out["embed"] = leave_one_out(geo.embed_dim, masks.set_stream)
            masks.clear()
            say(f"[upvit] {geo.embed_dim} embedding channels scored")
    finally:
        masks.close()
    return out


def _top(scores: np.ndarray, fraction: float) -> IndexSet:
    count = max(1, math.floor(fraction * scores.size + 0.5))
    order = np.argsort(-scores, kind="stable")
    return IndexSet(scores.size, tuple(sorted(int(i) for i in order[:count])))


def _structure(scores: dict, fraction: float, embed: bool) -> Structure:
    blocks = {
        i: BlockStructure(heads=_top(h, fraction), mlp=_top(m, fraction))
        for i, (h, m) in enumerate(zip(scores["heads"], scores["mlp"], strict=True))
    }
    return Structure(embed=_top(scores["embed"], fraction) if embed else None, blocks=blocks)


def upvit_plan(
    model: torch.nn.Module,
    proxy: torch.Tensor,
    budget: Budget,
    *,
    model_id: str,
    embed: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PruningPlan:
    """The UP-ViT structural plan of ``model`` within ``budget`` (see the module docstring);
    ``embed=False`` keeps the embedding width."""
    from vitsparse.flop_count import flops
    from vitsparse.pruning.api import compose_plan

    if budget.metric != "flops":
        raise PlanError("upvit spends a FLOPs budget (e.g. flops=0.5); params is not supported")
    scores = importance(model, proxy, progress=progress)
    dense = flops(model).macs

    def plan_at(fraction):
        structure = _structure(scores, fraction, embed)
        return compose_plan(model, model_id=model_id, method="upvit", structure=structure)

    lo, hi = 0.0, 1.0  # kept fraction: the largest whose FLOPs fit
    best = None
    for _ in range(30):
        mid = (lo + hi) / 2
        plan = plan_at(mid)
        if flops(model, plan).macs <= budget.fraction * dense:
            best, lo = plan, mid
        else:
            hi = mid
    if best is None:
        raise PlanError(f"budget flops={budget.fraction} is below what upvit's structures reach")
    return best
