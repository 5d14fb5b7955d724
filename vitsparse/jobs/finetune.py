"""The finetune job: recover a pruned model's accuracy by distillation from the dense model,
keeping its plan, and write what compiles like any other plan.

    finetune(model, plan=..., data=..., out="out/ft", steps=500)

The student is the plan applied to the model (`apply_plan_to_torch`: removed heads, dimensions,
neurons, channels and tokens are physically gone; pruned blocks are zero and stay exactly zero:
their gradients are masked and the weights re-zeroed after every step). The loss is the KL
divergence to the teacher (the dense model, or ``teacher=`` another checkpoint of it) at a
temperature, plus cross-entropy where the data has labels. AdamW with linear warm-up and cosine
decay, seeded; the held-out split is evaluated before training and at the end of every epoch, and
the best epoch's weights are kept.

OUT/ ends with ``model.pt`` (the model's full state dict, the fine-tuned values in every kept
entry: ``--checkpoint OUT/model.pt``), ``plan.json`` (the plan re-issued for those weights: same
structure and masks, new weights hash) and ``finetune.json`` (the report). While it runs,
``state.pt`` (written atomically every ``save_every`` steps and at every epoch's end) lets
``resume=True`` continue after any interruption, to the same result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vitsparse._io import write_bytes_atomic, write_text_atomic
from vitsparse._progress import ProgressBar
from vitsparse.data.training import training_data
from vitsparse.errors import TrainingError
from vitsparse.frontend import RANDOM_WEIGHTS_SEED, load_torch_model
from vitsparse.frontend.loading import load_checkpoint
from vitsparse.jobs.finetune_report import (
    MODEL_FILE,
    PLAN_FILE,
    REPORT_FILE,
    EpochResult,
    FinetuneConfig,
    FinetuneReport,
)
from vitsparse.plan import (
    PruningPlan,
    apply_plan_to_torch,
    load_plan,
    validate_plan,
    weights_hash,
)
from vitsparse.plan.pruned_vit import dense_state_dict
from vitsparse.pruning.evaluate import EvalReport, compare
from vitsparse.pruning.recovery import BlockMasks, distillation_loss, warmup_cosine

STATE_FILE = "state.pt"
STATE_FORMAT = "vitsparse-finetune-state/1"


def finetune(
    source,
    *,
    plan: PruningPlan | str | Path,
    data: str | Path,
    out: str | Path,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights_seed: int = RANDOM_WEIGHTS_SEED,
    teacher: str | Path | None = None,
    resume: bool = False,
    model_id: str | None = None,
    progress: Callable[[str], None] | None = print,
    **options,
) -> FinetuneReport:
    """Fine-tune ``source`` (a timm name, the built-in digits ViT or an ``nn.Module``, with
    ``checkpoint``/``pretrained`` weights) pruned by ``plan`` on ``data`` (an ImageFolder
    directory, ``"digits-train"`` or ``"synthetic"``, see `vitsparse.data.training`) into the
    directory ``out`` (see the module docstring). ``options`` are `FinetuneConfig`'s: the budget
    (``steps`` or ``epochs``), ``batch_size``, ``lr``, ``weight_decay``, ``warmup``,
    ``temperature``, ``kd_weight``, ``ce_weight``, ``seed``, ``save_every``. ``teacher``: a
    checkpoint of the same architecture to distil from instead of the dense model. ``resume``:
    continue the run whose state ``out`` holds. Every bad input is an error before anything is
    written; ``model_id`` names the model in the report (default: as loaded)."""
    say = progress or (lambda _line: None)
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TrainingError(f"unknown fine-tune option(s) {unknown}; known: {sorted(known)}")
    config = FinetuneConfig(**options)
    config.check()
    out = Path(out)
    state = check_output(out, resume)
    if resume and state is None:
        say(f"[finetune] nothing saved in {out} yet: starting from the beginning")
    plan = load_plan(plan)
    model, loaded_id = load_torch_model(
        source, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    model_id = model_id or loaded_id
    validate_plan(plan, model)  # a plan of another model or of other weights fails here
    teacher_model = copy.deepcopy(model).eval()
    if teacher is not None:
        load_checkpoint(teacher_model, teacher, model_id=f"{model_id} (teacher)")
    train = training_data(data, image_size=model.patch_embed.img_size[0], seed=config.seed)
    classes = getattr(model, "num_classes", None)
    if train.classes is not None and classes is not None and train.classes > classes:
        raise TrainingError(
            f"{train.name} has {train.classes} classes; {model_id} predicts {classes}: "
            "train it on data of its own classes"
        )
    run_id = {
        "data": train.name,
        "images": train.size,
        "teacher": weights_hash(teacher_model) if teacher is not None else "dense",
    }
    job = _Job(model, plan, teacher_model, train, config, say, run_id)
    if state is not None:
        job.restore(state, plan)
    report = FinetuneReport(
        model=model_id,
        data=train.name,
        data_free=train.data_free,
        device=str(job.device),
        config=config,
        total_steps=job.total,
        steps_per_epoch=job.per_epoch,
        teacher=str(teacher) if teacher is not None else "the dense model",
        held_out=train.held_out.name,
        out=str(out),
    )
    if train.data_free:
        say("[finetune] synthetic images: data-free distillation (the teacher labels them)")
    out.mkdir(parents=True, exist_ok=True)
    job.run(out, plan)
    report.history, report.best_epoch = job.history, job.best_epoch
    report.seconds = job.seconds
    _write_result(out, model, plan, job, report)
    return report


def check_output(out: str | Path, resume: bool = False) -> dict | None:
    """The saved state of ``out`` to resume (None for a new run: ``out`` missing or empty,
    also with ``resume``, as when a run was stopped before its first save); TrainingError when
    ``out`` cannot take this run."""
    out = Path(out)
    empty = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    if resume and not empty:
        if not (out / STATE_FILE).is_file():
            finished = (out / PLAN_FILE).is_file()
            why = "the run there has finished" if finished else f"it holds no {STATE_FILE}"
            raise TrainingError(f"nothing to resume in {str(out)!r}: {why}")
        if not _writable(out):
            raise TrainingError(f"cannot write the output {str(out)!r}: it is not writable")
        try:
            state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
            raise TrainingError(f"{out / STATE_FILE}: not a fine-tune state ({err})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{out / STATE_FILE}: not a vitsparse fine-tune state")
        return state
    if not empty:
        raise TrainingError(
            f"output {str(out)!r} exists and is not an empty directory; choose another -o, or "
            "--resume to continue the run in it"
        )
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not _writable(parent):
        raise TrainingError(
            f"cannot write the output {str(out)!r}: {str(parent)!r} is not writable"
        )
    return None


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


class _Job:
    """One fine-tune run: the student, its optimizer and schedule, the step it is at."""

    def __init__(self, model, plan, teacher, data, config: FinetuneConfig, say, run_id: dict):
        self.config, self.data, self.say, self.run_id = config, data, say, run_id
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(config.seed)
        self.student = apply_plan_to_torch(model, plan).to(self.device)
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.masks = BlockMasks(self.student, plan)
        self.per_epoch = -(-data.size // config.batch_size)
        self.total = config.steps or config.epochs * self.per_epoch
        self.optimizer = torch.optim.AdamW(
            _decay_groups(self.student, config.weight_decay), lr=config.lr
        )
        warmup = round(config.warmup * self.total)
        self.schedule = warmup_cosine(self.optimizer, self.total, warmup)
        self.step, self.history, self.seconds = 0, [], 0.0
        self.best_epoch, self.best_state, self.losses = 0, None, []
        # Mixed precision on a GPU: bfloat16 where it has it, else float16 with a loss scaler.
        self.amp = self.device.type == "cuda"
        bf16 = self.amp and torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 or not self.amp else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and not bf16)

    # --- state ---------------------------------------------------------------------------

    def state(self, plan: PruningPlan) -> dict:
        return {
            "format": STATE_FORMAT,
            "config": dataclasses.asdict(self.config),
            "plan": plan.digest(),
            "run": self.run_id,
            "rng": _rng_state(),
            "step": self.step,
            "student": _cpu(self.student.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": [dataclasses.asdict(r) for r in self.history],
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "losses": self.losses,
            "seconds": self.seconds,
        }

    def restore(self, state: dict, plan: PruningPlan) -> None:
        if state["config"] != dataclasses.asdict(self.config):
            changed = sorted(
                k for k, v in dataclasses.asdict(self.config).items() if state["config"][k] != v
            )
            raise TrainingError(
                f"the run to resume was started with other options ({', '.join(changed)}); "
                "give the same ones"
            )
        if state["plan"] != plan.digest():
            raise TrainingError("the run to resume was started with another plan or weights")
        if state["run"] != self.run_id:
            was = state["run"]
            changed = sorted(k for k, v in self.run_id.items() if was[k] != v)
            before = ", ".join(f"{k} {was[k]}" for k in changed)
            raise TrainingError(
                f"the run to resume was started with another {' and '.join(changed)} "
                f"({before}); give the same"
            )
        _set_rng_state(state["rng"])
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.seconds = state["step"], state["seconds"]
        self.history = [EpochResult(**r) for r in state["history"]]
        self.best_epoch, self.best_state = state["best_epoch"], state["best_state"]
        self.losses = state["losses"]
        self.say(f"[finetune] resuming at step {self.step}/{self.total}")

    def save(self, out: Path, plan: PruningPlan) -> None:
        buffer = io.BytesIO()
        torch.save(self.state(plan), buffer)
        write_bytes_atomic(out / STATE_FILE, buffer.getvalue())

    # --- training ------------------------------------------------------------------------

    def run(self, out: Path, plan: PruningPlan) -> None:
        if not self.history:
            self.history.append(self.evaluate(epoch=0, loss=None))
            self.best_state = _cpu(self.student.state_dict())
            self._say_epoch(self.history[-1])
            self.save(out, plan)
        self.masks.hook()
        bar = ProgressBar(f"[finetune] {self.total} steps", self.total, self.say, step=0.1)
        bar.done = self.step
        try:
            while self.step < self.total:
                epoch = self.step // self.per_epoch
                end = min(self.total, (epoch + 1) * self.per_epoch)
                order = self.data.order(epoch, self.config.seed)
                while self.step < end:
                    began = time.perf_counter()
                    note = self.train_step(epoch, order)
                    self.seconds += time.perf_counter() - began
                    bar.advance(1, f"epoch {epoch + 1}: {note}")
                    if self.step % self.config.save_every == 0 and self.step < end:
                        self.save(out, plan)
                self.finish_epoch(epoch)
                self.save(out, plan)
        finally:
            self.masks.unhook()

    def train_step(self, epoch: int, order: torch.Tensor) -> str:
        """One optimizer step on the next batch of the epoch's order; the running loss and
        accuracy (on labels, or agreement with the teacher) as a progress note."""
        config = self.config
        first = (self.step % self.per_epoch) * config.batch_size
        indices = order[first : first + config.batch_size]
        x, y = self.data.batch(epoch, self.step % self.per_epoch, indices, config.seed)
        x = x.to(self.device)
        y = None if y is None else y.to(self.device)
        self.student.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            with torch.no_grad():
                target = self.teacher(x)
            logits = self.student(x)
            loss = distillation_loss(
                logits.float(),
                target.float(),
                y,
                temperature=config.temperature,
                kd_weight=config.kd_weight,
                ce_weight=config.ce_weight,
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.masks.apply()
        self.step += 1
        reference = target.argmax(-1) if y is None else y
        hits = float((logits.argmax(-1) == reference).float().mean())
        self.losses.append((float(loss.detach()), hits))
        loss_mean, hits_mean = np.mean(self._this_epoch(), axis=0)
        what = "agreement" if y is None else "accuracy"
        return f"loss {loss_mean:.4f}, {what} {100 * hits_mean:.1f}%"

    def _this_epoch(self) -> list:
        """(loss, hit rate) of each step of the epoch so far."""
        return self.losses[-((self.step - 1) % self.per_epoch + 1) :]

    def finish_epoch(self, epoch: int) -> None:
        result = self.evaluate(epoch + 1, float(np.mean([v[0] for v in self._this_epoch()])))
        self.history.append(result)
        if _score(result) > _score(self.best):
            self.best_epoch, self.best_state = result.epoch, _cpu(self.student.state_dict())
        self._say_epoch(result)

    @property
    def best(self) -> EpochResult:
        return next(r for r in self.history if r.epoch == self.best_epoch)

    def evaluate(self, epoch: int, loss: float | None) -> EpochResult:
        report: EvalReport = compare(self.teacher, self.student, self.data.held_out)
        return EpochResult(
            epoch, self.step, loss, report.top1_pruned, report.agreement, report.mean_kl,
            self.seconds,
        )  # fmt: skip

    def _say_epoch(self, r: EpochResult) -> None:
        top1 = "" if r.top1 is None else f"top-1 {100 * r.top1:.2f}%, "
        what = "before training" if r.epoch == 0 else f"after epoch {r.epoch}"
        self.say(
            f"[finetune] held out, {what}: {top1}agreement {100 * r.agreement:.2f}%, "
            f"mean KL {r.mean_kl:.4f}"
        )


def _score(result: EpochResult) -> tuple:
    """Higher is better: held-out top-1 where there are labels, then agreement, then low KL."""
    return (result.top1 or 0.0, result.agreement, -result.mean_kl)


def _write_result(out: Path, model, plan: PruningPlan, job: _Job, report: FinetuneReport):
    """The best epoch's weights as the model's full state dict, the plan re-issued for them and
    the report, each written atomically; then the run's state is removed."""
    student = job.student.cpu()
    student.load_state_dict(job.best_state)
    job.masks.keep = {
        name: (student.get_submodule(name).weight, keep.cpu())
        for name, (_, keep) in job.masks.keep.items()
    }
    job.masks.check()  # every pruned block exactly zero, after training
    if plan.structure is None or plan.structure.empty:
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    else:
        state = dense_state_dict(model, plan.structure, student)
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(state)
    reissued = dataclasses.replace(plan, weights_hash=weights_hash(tuned), weights_seed=None)
    # The checkpoint and the re-issued plan are the student, exactly.
    x = job.data.held_out.images[:8]
    with torch.no_grad():
        again = apply_plan_to_torch(tuned, reissued).eval()(x)
        expected = student.eval()(x)
    if not torch.allclose(again, expected, rtol=0, atol=1e-5):
        raise RuntimeError("the fine-tuned checkpoint and plan do not reproduce the student")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(out / MODEL_FILE, buffer.getvalue())
    reissued.save(out / PLAN_FILE)
    write_text_atomic(out / REPORT_FILE, json.dumps(report.to_json(), indent=2) + "\n")
    (out / STATE_FILE).unlink(missing_ok=True)


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the weight matrices, none on biases, norms,
    position embeddings and class tokens (the usual ViT recipe)."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            flat = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token"))
            (plain if flat else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _rng_state() -> dict:
    """The global generators (dropout and drop-path draw from them)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
