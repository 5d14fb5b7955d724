"""Recovering a pruned model's accuracy, in PyTorch: the distillation loss, a plan's block masks
kept exactly zero while the model trains, and the learning-rate schedule (linear warm-up, then
cosine decay). `vitsparse.jobs.finetune` trains with them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitsparse.plan import PruningPlan


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
) -> torch.Tensor:
    """``kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))``, plus ``ce_weight *``
    the cross-entropy of ``student`` with ``labels`` where there are labels (the T^2 keeps the
    soft targets' gradients on the scale of the hard ones)."""
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student / t, dim=-1),
        F.log_softmax(teacher / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    loss = kd_weight * t * t * kd
    if labels is not None and ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student, labels)
    return loss


class BlockMasks:
    """A plan's block masks on the weights of its pruned model (`apply_plan_to_torch`): the
    gradients of pruned blocks are zeroed as they are computed (`hook`), the weights re-zeroed
    after every optimizer step (`apply`), and `check` raises unless every pruned block is exactly
    zero."""

    def __init__(self, model: torch.nn.Module, plan: PruningPlan):
        self.keep = {}
        for name, mask in plan.layers.items():
            weight = model.get_submodule(name).weight
            self.keep[name] = (weight, torch.from_numpy(mask.element_mask()).to(weight.device))
        self._handles = []

    def hook(self) -> None:
        for weight, keep in self.keep.values():
            self._handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))

    def unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def apply(self) -> None:
        with torch.no_grad():
            for weight, keep in self.keep.values():
                weight.mul_(keep)

    def check(self) -> None:
        for name, (weight, keep) in self.keep.items():
            nonzero = int(torch.count_nonzero(weight.detach()[~keep]))
            if nonzero:
                raise RuntimeError(f"{name}: {nonzero} weights of pruned blocks are not zero")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rises linearly over ``warmup_steps``, then decays to zero along a
    cosine until ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
