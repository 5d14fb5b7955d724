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
        else:
            lines.append("fidelity  - (no plan: nothing pruned to compare with the dense model)")
        return "\n".join(lines)


def _logits(model, data: ImageSet, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat(
            [model(batch.to(device)).float().cpu() for batch in data.batches(batch_size)]
        )


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
    if plan is None:
        dense = _logits(model.eval(), data, batch_size)
        return EvalReport(data.name, len(data), _top1(dense, data.labels), None, None, None)
    pruned_model = apply_plan_to_torch(model, plan, check_hash=check_hash)
    return compare(model, pruned_model, data, batch_size=batch_size)


def compare(
    dense_model: torch.nn.Module,
    pruned_model: torch.nn.Module,
    data: ImageSet,
    *,
    batch_size: int = 64,
) -> EvalReport:
    """Top-1 of both models on ``data`` and the pruned one's fidelity to the dense one (a
    fine-tuned student against its teacher, say); both are left in eval mode."""
    dense = _logits(dense_model.eval(), data, batch_size)
    pruned = _logits(pruned_model.eval(), data, batch_size)
    agreement, kl = fidelity(dense, pruned)
    labels = data.labels
    return EvalReport(
        data.name, len(data), _top1(dense, labels), _top1(pruned, labels), agreement, kl
    )


def fidelity(dense, pruned) -> tuple[float, float]:
    """(top-1 agreement, mean KL(dense || pruned)) of two batches of logits (tensors or
    arrays)."""
    dense, pruned = torch.as_tensor(dense).float(), torch.as_tensor(pruned).float()
    agreement = float((pruned.argmax(-1) == dense.argmax(-1)).float().mean())
    log_p, log_q = dense.log_softmax(-1), pruned.log_softmax(-1)
    return agreement, float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _top1(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    return None if labels is None else float((logits.argmax(-1) == labels).float().mean())
