"""The tune job: MetaSchedule refines the hand-written schedules, per target, into a database.

For each distinct kernel of the compiled model (pruned by a plan, when given):
1. the hand-written schedule is built, measured on the device (`vitsparse.devices.measure`)
   and committed as the kernel's first record, so the database's best is never worse than the
   untuned compile;
2. MetaSchedule searches what is left of the trial budget (`vitsparse.schedules.tuning`), with
   the builder and runner of the device (`vitsparse.devices.metaschedule`).
The budget is for the whole model; trials already in the database count against it, so an
interrupted job resumes. Over RPC, a device that goes away stops the job within seconds
(`vitsparse.devices.DeviceWatch`), keeping every record measured.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vitsparse._tvm import ms
from vitsparse.devices import DeviceWatch, RpcDevice, Timing, check_measurable, measure
from vitsparse.devices.metaschedule import builder_for, runner_for
from vitsparse.devices.rpc import device_threads
from vitsparse.devices.threads import configure_threads
from vitsparse.errors import TargetError
from vitsparse.frontend import RANDOM_WEIGHTS_SEED, import_model
from vitsparse.jobs._inputs import resolve_inputs, source_label
from vitsparse.jobs.compile import prepare, quantization_for
from vitsparse.passes import pipeline
from vitsparse.schedules import tuning
from vitsparse.schedules.database import open_target_database, target_dir
from vitsparse.targets import TargetSpec, with_cores

DEFAULT_TRIALS_PER_KERNEL = 12
# How MetaSchedule's runner measures a candidate; hand-schedule records are measured the same.
EVALUATOR = Timing(repeat=3, number=5, warmup=0, min_repeat_ms=20)


@dataclass
class KernelResult:
    name: str
    calls: int
    trials_before: int
    trials_after: int
    hand_ms: float | None
    best_ms: float | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TuneReport:
    model: str
    target_key: str
    db_dir: str
    budget: int
    seconds: float
    kernels: list[KernelResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "target_key": self.target_key,
            "db_dir": self.db_dir,
            "budget_trials": self.budget,
            "seconds": self.seconds,
            "kernels": [k.to_json() for k in self.kernels],
        }

    def summary(self) -> str:
        lines = [
            f"tuned {self.model} for {self.target_key} in {self.seconds:.0f} s "
            f"(budget {self.budget} trials) -> {self.db_dir}",
            f"{'kernel':48} {'calls':>5} {'trials':>7} {'hand ms':>9} {'best ms':>9}",
        ]
        for k in self.kernels:
            hand = f"{k.hand_ms:.4f}" if k.hand_ms is not None else "-"
            best = f"{k.best_ms:.4f}" if k.best_ms is not None else "-"
            lines.append(f"{k.name[:48]:48} {k.calls:>5} {k.trials_after:>7} {hand:>9} {best:>9}")
        return "\n".join(lines)


def tune(
    source,
    *,
    target="x86",
    db: str | Path,
    trials: int | None = None,
    batch: int = 1,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights_seed: int = RANDOM_WEIGHTS_SEED,
    cuda_arch: str | None = None,
    plan=None,
    rpc: RpcDevice | None = None,
    precision: str = "fp32",
    calib: str | Path | None = None,
    calib_size: int = 64,
    progress: Callable[[str], None] | None = print,
) -> TuneReport:
    """Tune every kernel of ``source`` compiled for ``target`` into the database under ``db``.

    With ``plan`` (a PruningPlan or its JSON file) the pruned model's kernels are tuned: its
    block-sparse kernels included, so that ``compile --plan`` finds their records.

    ``trials`` is the total MetaSchedule trial budget for the model (default: 12 per distinct
    kernel); trials already in the database count against it, so re-running resumes.

    With ``rpc`` (a `vitsparse.devices.RpcDevice`) candidates are built here (cross-compiled
    where the target needs it) and measured on a device of its key through the tracker. Records
    are committed as they are measured, so an interrupted job resumes when re-run. A device that
    disappears mid-job stops it within seconds: TargetError names the device and where the
    records measured before it went are kept.

    ``precision`` int8, bf16 or fp16 tunes that model's kernels (int8 calibrated on ``calib``, as
    compile does) into the precision's own database directory (its target key ends in
    ``-int8``, ``-bf16`` or ``-fp16``).
    """
    say = progress or (lambda _msg: None)
    # The target, the database, the plan and the device fail before the (slow) import.
    inputs = resolve_inputs(
        target=target,
        cuda_arch=cuda_arch,
        plan=plan,
        precision=precision,
        calib=calib,
        calib_size=calib_size,
    )
    check_measurable(inputs.spec, rpc, "tuning")
    spec = inputs.spec
    if rpc is not None:
        rpc.check()
        if "num-cores" not in spec.target.attrs:  # MetaSchedule needs it; ask the device
            spec = with_cores(spec, device_threads(rpc))
            say(f"[tune] the {rpc.key!r} device runs {_threads(spec)} threads (target num-cores)")
    open_target_database(db, spec, create=False)  # a corrupt database fails now
    start = time.time()
    say(f"[tune] importing {source_label(source)}")
    imported = import_model(
        source, batch=batch, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    quantization = quantization_for(imported, inputs)
    mod, config, params = prepare(
        imported, spec, inputs.plan, quantization=quantization, precision=inputs.precision
    )
    mod = pipeline.optimize(mod, config, params, stop_before="schedule")
    kernels = []
    for kernel in tuning.extract_kernels(mod):
        if kernel.takes_indices:
            say(
                f"[tune] {kernel.name}: not tuned (it reads index inputs, and measuring it on "
                "random indices would read out of bounds); it keeps its hand-written schedule"
            )
        else:
            kernels.append(kernel)
    budget = trials if trials is not None else DEFAULT_TRIALS_PER_KERNEL * len(kernels)
    database = open_target_database(db, spec, create=True)
    directory = str(target_dir(db, spec))
    report = TuneReport(imported.model_id, spec.key, directory, budget, 0.0)

    def kept() -> str:
        return f"The {len(database)} tuning records measured are kept in {directory}"

    watch = contextlib.nullcontext() if rpc is None else DeviceWatch(rpc, kept)
    with watch:
        report.kernels = tune_kernels(kernels, spec, database, budget, say, directory, rpc)
    report.seconds = time.time() - start
    return report


def tune_kernels(
    kernels: list[tuning.Kernel],
    spec: TargetSpec,
    database,
    budget: int,
    say=print,
    where: str = "the database",
    rpc: RpcDevice | None = None,
) -> list[KernelResult]:
    """Seed each kernel's hand-written schedule into ``database`` and spend what is left of
    ``budget`` (trials already recorded count against it) on MetaSchedule's search; measured
    here, or on a device of ``rpc``."""
    threads = _threads(spec) if rpc is not None else configure_threads()
    evaluator = ms.runner.EvaluatorConfig(
        number=EVALUATOR.number, repeat=EVALUATOR.repeat, min_repeat_ms=EVALUATOR.min_repeat_ms
    )
    runner = runner_for(
        spec,
        rpc,
        evaluator,
        threads=threads,
        alloc_local=tuning.bsr_alloc_argument,
        alloc_rpc=tuning.bsr_alloc_argument_rpc,
    )
    if rpc is not None:
        say(f"[tune] measuring on a {rpc.key!r} device via the tracker {rpc.tracker}")
    before = {k.name: len(tuning.kernel_records(database, k)) for k in kernels}

    # 1. The hand-written schedules, measured and committed once per kernel.
    seeds = [k for k in kernels if before[k.name] == 0]
    if seeds:
        say(f"[tune] measuring the hand-written schedules of {len(seeds)} kernels")
        for i, kernel in enumerate(seeds, 1):
            _seed(kernel, spec, database, rpc, say, f"{i}/{len(seeds)}")
    hand = {k.name: tuning.best_ms(tuning.kernel_records(database, k)) for k in kernels}

    # 2. MetaSchedule search for what is left of the budget.
    spent = sum(max(n - 1, 0) for n in before.values())
    remaining = budget - spent
    if remaining <= 0:
        say(f"[tune] budget of {budget} trials already spent in {where}; nothing to do")
    else:
        say(
            f"[tune] searching: {remaining} trials over {len(kernels)} kernels "
            f"({spent} already in the database)"
        )
        tuning.search(
            kernels,
            spec.target,
            database,
            remaining,
            builder=builder_for(spec),
            runner=runner,
            say=say,
        )
    results = []
    for k in kernels:
        found = tuning.kernel_records(database, k)
        results.append(
            KernelResult(
                k.name, k.calls, before[k.name], len(found), hand[k.name], tuning.best_ms(found)
            )
        )
    return results


def _seed(kernel: tuning.Kernel, spec: TargetSpec, database, rpc, say, step: str) -> None:
    """Measure ``kernel``'s hand-written schedule on the device and commit it as a record;
    a schedule that fails to build or run is skipped with the reason (a device that is gone
    stops the job)."""
    sch = tuning.hand_schedule(kernel, spec.target)
    if sch is None:
        return
    try:
        lib = pipeline.compile_module(sch.mod, spec.target)
        args = tuning.kernel_arguments(kernel)
        measured = measure(lib, spec, args, rpc=rpc, vm=False, timing=EVALUATOR)
    except TargetError as err:
        if rpc is None:
            raise
        rpc.check()  # the device is gone: its TargetError ends the job
        failure = _last_line(err)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types when it builds
        failure = _last_line(err)
    else:
        tuning.commit_record(database, kernel, sch, measured.seconds, spec.target)
        ms = measured.latency.median_ms
        say(f"[tune]   {kernel.name}: {ms:.4f} ms (hand-written schedule, {step})")
        return
    say(f"[tune]   {kernel.name}: hand schedule failed to build/run ({failure}); skipped")


def _threads(spec: TargetSpec) -> int:
    cores = spec.target.attrs.get("num-cores")
    return int(cores) if cores else configure_threads()


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__
