"""What a (pruned) model costs, for the public API (``vitsparse.flops``, ``vitsparse.params``): a
timm model name or an ``nn.Module`` counted analytically from its geometry and a plan
(`vitsparse.pruning.flops`), a Relax module from the shapes of what its ``main`` runs
(`vitsparse.passes.macs`)."""

from __future__ import annotations

from pathlib import Path

import torch

from vitsparse._tvm import IRModule
from vitsparse.frontend import load_torch_model
from vitsparse.passes.macs import relax_macs
from vitsparse.plan import PruningPlan
from vitsparse.pruning import flops as counts
from vitsparse.pruning.flops import FlopsReport


def flops(source, plan: PruningPlan | str | Path | None = None, *, batch: int = 1) -> FlopsReport:
    """MACs/FLOPs of ``source`` pruned by ``plan`` (a PruningPlan, its JSON file, or a bare
    `Structure`): a timm model name or an ``nn.Module`` is counted analytically from its geometry
    and the plan; a Relax ``IRModule`` as it is, from the shapes of the matmuls and convolutions
    its ``main`` runs (``plan`` must then be None)."""
    if isinstance(source, IRModule):
        if plan is not None:
            raise ValueError("a Relax module is counted as it is; pass plan=None")
        return FlopsReport("relax module", batch, relax_macs(source))
    model, model_id = _model(source)
    return counts.flops(model, plan, batch=batch, model_id=model_id)


def params(source, plan: PruningPlan | str | Path | None = None) -> int:
    """Weights of ``source`` (a timm model name or an ``nn.Module``) pruned by ``plan``: the
    patch projection, every linear layer of the blocks (a block-masked layer counts its kept
    blocks) and the classifier."""
    return counts.params(_model(source)[0], plan)


def _model(source) -> tuple[torch.nn.Module, str]:
    """A module as it is (named by its class), else the model the name loads."""
    if isinstance(source, torch.nn.Module):
        return source, type(source).__name__
    return load_torch_model(source)
