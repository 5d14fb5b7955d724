"""What a fine-tune is asked to do (`FinetuneConfig`), what it measured epoch by epoch
(`EpochResult`) and its report (`FinetuneReport`, ``finetune.json``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vitsparse.errors import TrainingError

MODEL_FILE, PLAN_FILE, REPORT_FILE = "model.pt", "plan.json", "finetune.json"
REPORT_FORMAT = "vitsparse-finetune/1"


@dataclass(frozen=True)
class FinetuneConfig:
    """How a fine-tune trains (recorded in its state: a resumed run must use the same)."""

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1  # the fraction of the steps the learning rate warms up over
    temperature: float = 4.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    seed: int = 0
    save_every: int = 50

    def check(self) -> None:
        """TrainingError naming the first option that cannot work."""
        if (self.steps is None) == (self.epochs is None):
            raise TrainingError("give the training budget as steps or as epochs (one of them)")
        for name in ("steps", "epochs", "batch_size", "save_every"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise TrainingError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise TrainingError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "kd_weight", "ce_weight"):
            if not getattr(self, name) >= 0:
                raise TrainingError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise TrainingError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise TrainingError("kd_weight and ce_weight are both 0: nothing to train on")


@dataclass(frozen=True)
class EpochResult:
    """The held-out evaluation after an epoch (epoch 0: before training)."""

    epoch: int
    step: int
    train_loss: float | None
    top1: float | None  # the student's, where the held-out data has labels
    agreement: float  # top-1 agreement with the teacher
    mean_kl: float  # KL(teacher || student), nats
    seconds: float  # training time so far


@dataclass
class FinetuneReport:
    """What a fine-tune did: its setup, the held-out results epoch by epoch, the best epoch."""

    model: str
    data: str
    data_free: bool
    device: str
    config: FinetuneConfig
    total_steps: int
    steps_per_epoch: int
    teacher: str
    held_out: str
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    out: str = ""

    @property
    def before(self) -> EpochResult:
        return self.history[0]

    @property
    def best(self) -> EpochResult:
        return next(r for r in self.history if r.epoch == self.best_epoch)

    def to_json(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "history"},
            "history": [dataclasses.asdict(r) for r in self.history],
        }

    def summary(self) -> str:
        def pct(value):
            return "-" if value is None else f"{100 * value:.2f}%"

        before, best = self.before, self.best
        lines = [
            f"model     {self.model}, fine-tuned on {self.data} ({self.device}, "
            f"{self.total_steps} steps of {self.config.batch_size}, {self.seconds:.0f} s)",
            f"teacher   {self.teacher}",
        ]
        if self.data_free:
            lines.append("data      synthetic images: data-free distillation, the teacher labels")
        lines += [
            f"held out  {self.held_out}: top-1 {pct(before.top1)} -> {pct(best.top1)}, agreement "
            f"with the teacher {pct(before.agreement)} -> {pct(best.agreement)}, mean KL "
            f"{before.mean_kl:.4f} -> {best.mean_kl:.4f} (best epoch {self.best_epoch})",
            f"output    {self.out} ({MODEL_FILE}, {PLAN_FILE}, {REPORT_FILE})",
        ]
        return "\n".join(lines)
