"""UP-ViT: structural pruning by KL leave-one-out importance, uniform ratios
(../shared/PAPERS.md, section 3).

The importance of a channel is ``KL(p_dense || p_without_it)`` summed over the proxy images, where
``p`` is the model's softmax output. Families: MLP neurons (the neuron's activation zeroed: its
fc1 row and fc2 column gone), attention heads (UP-ViT keeps heads whole, so a head is removed as
a unit: its output zeroed before proj), and embedding channels (the channel zeroed on the
residual stream after the embedding and after every block). Every block keeps the same fraction
of its heads and of its neurons, and the model that fraction of its embedding channels, the
highest-KL ones; the fraction is bisected until the model meets the budget (FLOPs or weights).

Cost: one forward pass over the proxy images per channel, batched (`importance`), from the block
the channel belongs to onwards; a progress bar reports the channels scored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vitsparse._progress import ProgressBar
from vitsparse.errors import DataError
from vitsparse.plan import PruningPlan, geometry_of
from vitsparse.pruning._hooks import hooked
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.uniform import uniform_plan


def _stem(model, images: torch.Tensor) -> torch.Tensor:
    """The tokens entering the first block (timm's ``forward_features`` up to the blocks)."""
    x = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(model.patch_drop(x))


def _tail(model, x: torch.Tensor, start: int, stream: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from the tokens entering block ``start``; ``stream`` (rows, E) multiplies the
    residual stream before the first of those blocks and after every one of them."""
    if stream is not None:
        x = x * stream[:, None, :]
    for blk in model.blocks[start:]:
        x = blk(x)
        if stream is not None:
            x = x * stream[:, None, :]
    return model.forward_head(model.norm(x))


class _BlockMask:
    """Forward hooks (``hooks``, registered by `hooked`) on one block that multiply its MLP
    activations or its head outputs (before proj) by per-row masks (rows of the batch,
    channels)."""

    def __init__(self, blk):
        self.mlp: torch.Tensor | None = None
        self.heads: torch.Tensor | None = None
        dim = blk.attn.head_dim

        def mlp_hook(_module, _inputs, out):
            return out if self.mlp is None else out * self.mlp[:, None, :]

        def head_hook(_module, inputs):
            if self.heads is None:
                return None
            (x,) = inputs
            return (x * self.heads.repeat_interleave(dim, dim=1)[:, None, :],)

        self.hooks = [(blk.mlp.act, "forward", mlp_hook), (blk.attn.proj, "pre", head_hook)]


def importance(
    model,
    images: torch.Tensor,
    *,
    batch: int = 256,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """KL leave-one-out importance: ``{"mlp": [per block (M,)], "heads": [per block (H,)],
    "embed": (E,)}`` as numpy arrays.

    Batched: the proxy images are repeated once per channel left out, up to ``batch`` rows a
    forward pass, each copy with its own channel zeroed. A channel of block ``i`` only changes
    blocks ``i`` onwards, so those passes start from the cached tokens entering block ``i``.
    ``progress`` gets a progress bar over all channels.
    """
    if len(images) == 0:
        raise DataError("the proxy (calibration) set is empty")
    geo = geometry_of(model)
    model = model.eval()
    n = len(images)
    per_pass = max(1, batch // n)  # channels left out per forward pass
    total = sum(geo.mlp_dim) + sum(geo.num_heads) + geo.embed_dim
    bar = ProgressBar(f"[upvit] {total} channels x {n} images", total, progress)
    out: dict = {"mlp": [], "heads": []}
    with torch.no_grad():
        inputs = [_stem(model, images)]
        for blk in model.blocks:
            inputs.append(blk(inputs[-1]))
        dense_log = model.forward_head(model.norm(inputs[-1])).log_softmax(-1)

        def leave_one_out(size: int, run) -> np.ndarray:
            """KL per channel; ``run(masks, x)`` gives the logits of rows masked by ``masks``."""
            scores = np.zeros(size)
            for first in range(0, size, per_pass):
                chans = range(first, min(size, first + per_pass))
                masks = torch.ones(len(chans), size)
                masks[torch.arange(len(chans)), torch.tensor(list(chans))] = 0
                logits = run(masks.repeat_interleave(n, dim=0))
                log_q = logits.log_softmax(-1).reshape(len(chans), n, -1)
                kl = (dense_log.exp() * (dense_log - log_q)).sum(dim=(1, 2))
                scores[first : first + len(chans)] = kl.double().numpy()
                bar.advance(len(chans))
            return scores

        for i, blk in enumerate(model.blocks):
            hooks = _BlockMask(blk)
            with hooked(hooks.hooks):

                def run_mlp(masks, i=i, hooks=hooks):
                    hooks.mlp = masks
                    x = inputs[i].repeat(len(masks) // n, 1, 1)
                    return _tail(model, x, i)

                out["mlp"].append(leave_one_out(geo.mlp_dim[i], run_mlp))
                hooks.mlp = None

                def run_heads(masks, i=i, hooks=hooks):
                    hooks.heads = masks
                    x = inputs[i].repeat(len(masks) // n, 1, 1)
                    return _tail(model, x, i)

                out["heads"].append(leave_one_out(geo.num_heads[i], run_heads))

        def run_stream(masks):
            return _tail(model, inputs[0].repeat(len(masks) // n, 1, 1), 0, stream=masks)

        out["embed"] = leave_one_out(geo.embed_dim, run_stream)
    return out


def upvit_plan(
    model: torch.nn.Module,
    proxy: torch.Tensor,
    budget: Budget,
    *,
    model_id: str,
    embed: bool = True,
    batch: int = 256,
    scores: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> PruningPlan:
    """The UP-ViT structural plan of ``model`` within ``budget`` (see the module docstring);
    ``embed=False`` keeps the embedding width; ``scores``: an `importance` result to reuse (one
    scoring serves every budget); ``batch``: rows per leave-one-out forward pass."""
    if scores is None:
        scores = importance(model, proxy, batch=batch, progress=progress)
    return uniform_plan(model, scores, budget, model_id=model_id, method="upvit", embed=embed)
