"""Accuracy and fidelity of a pruned model, in PyTorch (the reference the compiled model matches).

``evaluate(model, data, plan)`` runs the dense model and the plan applied to it
(`apply_plan_to_torch`) on the same images and reports top-1 accuracy for both (when the images
are labelled) and, always, the pruned model's fidelity to the dense one: top-1 agreement and the
mean KL divergence KL(dense || pruned) of their softmax outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vitsparse.data.sources import ImageSet
from vitsparse.plan import PruningPlan, apply_plan_to_torch, load_plan


@dataclass(frozen=True)
class EvalReport:
    """What `evaluate` measured (accuracies are None on unlabelled images)."""

    data: str
    images: int
    top1_dense: float | None
    top1_pruned: float | None
    agreement: float | None  # top-1 agreement of pruned with dense (None without a plan)
    mean_kl: float | None  # mean KL(dense || pruned) in nats (None without a plan)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}%"

        lines = [f"data      {self.data} ({self.images} images)"]
        lines.append(f"top-1     dense {pct(self.top1_dense)}, pruned {pct(self.top1_pruned)}")
        if self.agreement is not None:
            lines.append(
                f"fidelity  top-1 agreement {pct(self.agreement)}, mean KL {self.mean_kl:.4f}"
            )
        return "\n".join(lines)


def _logits(model, data: ImageSet, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch) for batch in data.batches(batch_size)])


def evaluate(
    model: torch.nn.Module,
    data: ImageSet,
    plan: PruningPlan | str | None = None,
    *,
    batch_size: int = 64,
    check_hash: bool = True,
) -> EvalReport:
    """Top-1 of ``model`` (and of it pruned by ``plan``) on ``data``, and the pruned model's
    fidelity to the dense one (see the module docstring)."""
    plan = load_plan(plan)
    dense = _logits(model.eval(), data, batch_size)
    labels = data.labels

    def top1(logits):
        return None if labels is None else float((logits.argmax(-1) == labels).float().mean())

    if plan is None:
        return EvalReport(data.name, len(data), top1(dense), None, None, None)
    pruned_model = apply_plan_to_torch(model, plan, check_hash=check_hash)
    pruned = _logits(pruned_model, data, batch_size)
    agreement = float((pruned.argmax(-1) == dense.argmax(-1)).float().mean())
    log_p, log_q = dense.log_softmax(-1), pruned.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return EvalReport(data.name, len(data), top1(dense), top1(pruned), agreement, kl)
