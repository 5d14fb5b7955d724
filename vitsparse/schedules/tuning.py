"""Tuning jobs: MetaSchedule refines the hand-written schedules, per target, into a database.

For each distinct kernel of the compiled model:
1. the hand-written schedule (cpu_rules) is built, measured and committed as the first record,
   so the database's best is never worse than the untuned compile;
2. MetaSchedule searches: the dense and block-sparse kernels in their own templates' spaces (the
   same templates, with their knobs sampled), every other kernel in MetaSchedule's default space
   for the target. A block-sparse kernel reads index arrays, so the runner fills them with a
   valid block structure (`bsr_alloc_argument`) instead of random bits.
The trial budget is for the whole model; re-running continues from the records already in the
database (trials already spent count against the budget), so an interrupted job resumes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitsparse._tvm import IRModule, ms, relax, structural_hash, tir, tvm
from vitsparse.compiler import prepare, set_num_threads
from vitsparse.errors import TargetError
from vitsparse.frontend import import_model
from vitsparse.passes import pipeline
from vitsparse.plan import load_plan
from vitsparse.schedules import bsr, cpu_rules, dense
from vitsparse.schedules.database import open_target_database, target_dir
from vitsparse.targets import resolve_target
from vitsparse.targets.presets import with_cores

DEFAULT_TRIALS_PER_KERNEL = 12
TRIALS_PER_ROUND = 8


@dataclass(frozen=True)
class Kernel:
    """One distinct kernel of the model and how often the model calls it."""

    name: str
    func: tir.PrimFunc
    calls: int

    @property
    def is_dense(self) -> bool:
        return dense.is_dense_kernel(self.func)

    @property
    def is_bsr(self) -> bool:
        return bsr.is_bsr_kernel(self.func)

    @property
    def takes_indices(self) -> bool:
        """Whether an input is an index buffer the runner cannot fill validly (gathers and the
        like; the BSR kernel's indices it can)."""
        if self.is_bsr:
            return False
        return any(str(p.dtype) in ("int32", "int64") for p in self.func.params[:-1])

    def workload(self) -> IRModule:
        return IRModule({"main": self.func.with_attr("global_symbol", "main")})


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


def extract_kernels(mod: IRModule) -> list[Kernel]:
    """Distinct PrimFuncs called by ``mod``'s main (structurally deduplicated), with call counts."""
    calls: dict[str, int] = {}

    def visit(node):
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op):
            if node.op.name == "relax.call_tir":
                name = node.args[0].name_hint
                calls[name] = calls.get(name, 0) + 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    by_hash: dict[int, Kernel] = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tir.PrimFunc) or gvar.name_hint not in calls:
            continue
        key = structural_hash(func.without_attr("global_symbol"))
        count = calls[gvar.name_hint]
        if key in by_hash:
            old = by_hash[key]
            by_hash[key] = Kernel(old.name, old.func, old.calls + count)
        else:
            by_hash[key] = Kernel(gvar.name_hint, func, count)
    return sorted(by_hash.values(), key=lambda k: k.name)


def _space(kernel: Kernel, target):
    if kernel.is_bsr:
        return ms.space_generator.ScheduleFn(
            bsr.cpu_design_space(bsr.vector_lanes(target)),
            sch_rules=[],
            postprocs=[],
            mutator_probs={ms.mutator.MutateTileSize(): 1.0},
        )
    if kernel.is_dense:
        return ms.space_generator.ScheduleFn(
            lambda sch: dense.schedule_dense_cpu(sch, None),
            sch_rules=[],
            postprocs=[],
            mutator_probs={ms.mutator.MutateTileSize(): 1.0},
        )
    return "post-order-apply"


def _hand_schedule(kernel: Kernel, target):
    func = kernel.workload()["main"]
    for rule in cpu_rules.default_rules():
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch
    return None


def _measure(schedules, target, builder, runner) -> list[list[float] | str]:
    """Per schedule: its run times (seconds), or the last line of its build or run error."""
    inputs = [ms.builder.BuilderInput(s.mod, target) for s in schedules]
    built = builder.build(inputs)
    runner_inputs, index = [], []
    out: list[list[float] | str] = [_last_line(r.error_msg) if r.error_msg else "" for r in built]
    for i, (res, sch) in enumerate(zip(built, schedules, strict=True)):
        if res.error_msg:
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
        runner_inputs.append(ms.runner.RunnerInput(res.artifact_path, "cpu", args))
        index.append(i)
    for i, future in zip(index, runner.run(runner_inputs), strict=True):
        result = future.result()
        if result.error_msg:
            out[i] = _last_line(result.error_msg)
        else:
            out[i] = [float(v) for v in result.run_secs]
    return out


def _last_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "unknown error"


def _records(database, workload_mod) -> list:
    if not database.has_workload(workload_mod):
        return []
    workload = database.commit_workload(workload_mod)
    return list(database.get_top_k(workload, 1 << 20))


def _best_ms(records) -> float | None:
    times = [sum(float(v) for v in r.run_secs) / len(r.run_secs) for r in records if r.run_secs]
    return min(times) * 1e3 if times else None


def tune(
    source,
    *,
    target="x86",
    db: str | Path,
    trials: int | None = None,
    batch: int = 1,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    cuda_arch: str | None = None,
    plan=None,
    rpc=None,
    progress: Callable[[str], None] | None = print,
) -> TuneReport:
    """Tune every kernel of ``source`` compiled for ``target`` into the database under ``db``.

    With ``plan`` (a PruningPlan or its JSON file) the pruned model's kernels are tuned: its
    block-sparse kernels included, so that ``compile --plan`` finds their records.

    ``trials`` is the total MetaSchedule trial budget for the model (default: 12 per distinct
    kernel); trials already in the database count against it, so re-running resumes.

    With ``rpc`` (a `vitsparse.targets.rpc.RpcDevice`) candidates are built here (cross-compiled
    where the target needs it) and measured on a device of its key through the tracker. Records
    are committed per measured batch, so an interrupted job resumes when re-run. A device that
    disappears mid-job stops it within seconds: TargetError names the device and where the
    records measured before it went are kept (`_DeviceWatch`).
    """
    say = progress or (lambda _msg: None)
    spec = resolve_target(target, cuda_arch=cuda_arch)
    from vitsparse.targets.rpc import check_measurable

    check_measurable(spec, rpc, "tuning")
    if rpc is not None:
        rpc.check()  # an unreachable tracker or an unknown key fails before the import
        if "num-cores" not in spec.target.attrs:  # MetaSchedule needs it; ask the device
            from vitsparse.targets.rpc import device_threads

            spec = with_cores(spec, device_threads(rpc))
            say(f"[tune] the {rpc.key!r} device runs {_threads(spec)} threads (target num-cores)")
    plan = load_plan(plan)  # a bad plan file fails before the (slow) import
    start = time.time()
    say(f"[tune] importing {source if isinstance(source, str | Path) else type(source).__name__}")
    imported = import_model(source, batch=batch, checkpoint=checkpoint, pretrained=pretrained)
    mod, config, _ = prepare(imported, spec, plan)
    mod = pipeline.optimize(mod, config, stop_before="schedule")
    kernels = []
    for kernel in extract_kernels(mod):
        if kernel.takes_indices:
            say(
                f"[tune] {kernel.name}: not tuned (it reads index inputs, and measuring it on "
                "random indices would read out of bounds); it keeps its hand-written schedule"
            )
        else:
            kernels.append(kernel)
    budget = trials if trials is not None else DEFAULT_TRIALS_PER_KERNEL * len(kernels)
    database = open_target_database(db, spec, create=True)
    directory = target_dir(db, spec)
    report = TuneReport(imported.model_id, spec.key, str(directory), budget, 0.0)
    watch = contextlib.nullcontext() if rpc is None else _DeviceWatch(rpc, database, str(directory))
    with watch:
        report.kernels = tune_kernels(kernels, spec, database, budget, say, str(directory), rpc)
    report.seconds = time.time() - start
    say(report.summary())
    return report


def tune_kernels(
    kernels: list[Kernel],
    spec,
    database,
    budget: int,
    say=print,
    where: str = "the database",
    rpc=None,
) -> list[KernelResult]:
    """Seed each kernel's hand-written schedule into ``database`` and spend what is left of
    ``budget`` (trials already recorded count against it) on MetaSchedule's search; measured
    here, or on a device of ``rpc`` (a `RpcDevice`)."""
    evaluator = ms.runner.EvaluatorConfig(number=5, repeat=3, min_repeat_ms=20)
    if rpc is None:
        builder = ms.builder.LocalBuilder(timeout_sec=120.0)
        runner = ms.runner.LocalRunner(
            timeout_sec=120.0,
            evaluator_config=evaluator,
            # Measure with the thread count the model runs with: a fresh worker's TVM pool
            # otherwise follows its CPU affinity, which can be a single core.
            initializer=functools.partial(set_num_threads, _threads(spec)),
            f_alloc_argument=bsr_alloc_argument,
        )
    else:
        from vitsparse.targets.rpc import rpc_runner

        export = None
        if spec.cross_compiler:
            export = functools.partial(_cross_export, cross_compiler=spec.cross_compiler)
        builder = ms.builder.LocalBuilder(timeout_sec=120.0, f_export=export)
        runner = rpc_runner(rpc, evaluator, f_alloc_argument=bsr_alloc_argument_rpc)
        say(f"[tune] measuring on a {rpc.key!r} device via the tracker {rpc.tracker}")
    before = {k.name: len(_records(database, k.workload())) for k in kernels}

    # 1. The hand-written schedules, measured and committed once per kernel.
    seeds = [k for k in kernels if before[k.name] == 0]
    if seeds:
        say(f"[tune] measuring the hand-written schedules of {len(seeds)} kernels")
        schedules = [_hand_schedule(k, spec.target) for k in seeds]
        pairs = [(k, s) for k, s in zip(seeds, schedules, strict=True) if s is not None]
        measured = _measure([s for _, s in pairs], spec.target, builder, runner)
        for (kernel, sch), secs in zip(pairs, measured, strict=True):
            if isinstance(secs, str):
                say(f"[tune]   {kernel.name}: hand schedule failed to build/run ({secs}); skipped")
                continue
            workload = database.commit_workload(kernel.workload())
            database.commit_tuning_record(
                ms.database.TuningRecord(
                    sch.trace,
                    workload,
                    secs,
                    spec.target,
                    ms.arg_info.ArgInfo.from_prim_func(kernel.workload()["main"]),
                )
            )
    hand = {k.name: _best_ms(_records(database, k.workload())) for k in kernels}

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
        contexts = [
            ms.TuneContext(
                mod=k.workload(),
                target=spec.target,
                space_generator=_space(k, spec.target),
                search_strategy=_search_strategy(),
                task_name=k.name,
                num_threads="physical",
                logger=_progress_logger(say, f"{i + 1}/{len(kernels)} {k.name}"),
            )
            for i, k in enumerate(kernels)
        ]
        with tempfile.TemporaryDirectory(prefix="vitsparse-tune-") as work_dir:
            ms.tune_tasks(
                tasks=contexts,
                task_weights=[float(k.calls) for k in kernels],
                work_dir=work_dir,
                max_trials_global=remaining,
                max_trials_per_task=max(remaining // len(kernels) * 2, TRIALS_PER_ROUND),
                num_trials_per_iter=TRIALS_PER_ROUND,
                builder=builder,
                runner=runner,
                database=database,
                cost_model="xgb",
                measure_callbacks="default",
                task_scheduler="gradient",
            )
    results = []
    for k in kernels:
        records = _records(database, k.workload())
        results.append(
            KernelResult(
                k.name, k.calls, before[k.name], len(records), hand[k.name], _best_ms(records)
            )
        )
    return results


def _threads(spec) -> int:
    cores = spec.target.attrs.get("num-cores")
    return int(cores) if cores else (os.cpu_count() or 1)


def _search_strategy():
    # MetaSchedule's defaults (population 512, 4 genetic rounds) spend minutes per round on
    # 2 cores before anything is measured; the hand schedule is already a good start.
    return ms.search_strategy.EvolutionarySearch(
        population_size=64,
        init_measured_ratio=0.1,
        init_min_unmeasured=16,
        genetic_num_iters=2,
    )


def _progress_logger(say: Callable[[str], None], task: str) -> logging.Logger:
    logger = logging.getLogger(f"vitsparse.tune.{task}")
    logger.setLevel(logging.INFO)
    logger.handlers = [_SayHandler(say, task)]
    logger.propagate = False
    return logger


class _SayHandler(logging.Handler):
    """MetaSchedule's per-task log -> progress lines: when a batch of candidates goes out for
    measurement, and each measured trial (speed and best so far)."""

    def __init__(self, say, task: str):
        super().__init__(logging.INFO)
        self.say = say
        self.task = task

    def emit(self, record):
        msg = record.getMessage()
        if "Trial #" in msg:
            # "[task_scheduler.cc:144] [Task #3: dense_gelu] Trial #5: GFLOPs: ..." -> drop the
            # source location, keep task, trial and speeds.
            self.say("[tune] " + msg.split("] ", 1)[-1].splitlines()[0][:160])
        elif "Sending" in msg:
            count = msg.split("Sending", 1)[1].split()[0]
            self.say(f"[tune] kernel {self.task}: {count} candidates sent for measurement")


def _cross_export(mod, cross_compiler: str) -> str:
    """MetaSchedule builder export for a cross-compiled target (runs in a builder worker)."""
    import os as _os
    import tempfile as _tempfile

    from tvm.support import cc

    path = _os.path.join(_tempfile.mkdtemp(prefix="vitsparse-build-"), "kernel.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path


class _DeviceLost(BaseException):
    """Raised in the main thread to stop a job whose device is gone (a BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way swallows it)."""


class _DeviceWatch:
    """While a job measures over RPC: asks the tracker every ``period`` seconds whether the
    device is still registered. Once it is gone (twice in a row), every measurement left would
    fail, so the job is stopped the way Ctrl-C stops it: SIGINT to the main thread, which raises
    `_DeviceLost` there, sent again every second until the job has stopped. On leaving, a lost
    device (also one that a last check finds gone) turns however the job ended into a
    TargetError that names the device and where the records measured before are kept."""

    def __init__(self, rpc, database, where: str, period: float = 2.0):
        self.rpc, self.database, self.where, self.period = rpc, database, where, period
        self.lost: str | None = None
        self._stop, self._lock, self._sent = threading.Event(), threading.Lock(), False
        # Signal handlers run in the main thread only: a job run elsewhere is not interrupted,
        # its measurements fail until it ends, and it then raises the same TargetError.
        self._main = threading.current_thread() is threading.main_thread()
        self._thread = threading.Thread(target=self._watch, name="vitsparse-device", daemon=True)

    def __enter__(self):
        self._started = time.time()
        if self._main:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._stop.set()
        self._thread.join(timeout=30)
        if self._main:
            if self._sent:
                time.sleep(0.05)  # a signal sent just before stopping arrives here, ignored
            signal.signal(signal.SIGINT, self._previous)
        if self.lost is None:
            try:
                self.rpc.check()
            except TargetError as err:
                self.lost = str(err)
        if self.lost is not None:
            self._kill_workers()
            raise TargetError(
                f"device {self.rpc.key!r} went away during the job: {self.lost}. The "
                f"{len(self.database)} tuning records measured are kept in {self.where}: "
                "re-run the same command once the device is back to resume"
            ) from None

    def _watch(self) -> None:
        misses = 0
        while not self._stop.wait(self.period if self.lost is None else 1.0):
            if self.lost is None:
                try:
                    self.rpc.check()
                    misses = 0
                    continue
                except TargetError as err:
                    misses += 1
                    if misses < 2:
                        continue
                    self.lost = str(err)
            with self._lock:
                if self._main and not self._stop.is_set():
                    self._sent = True
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _on_sigint(self, signum, frame) -> None:
        if self.lost is None:  # the user's Ctrl-C: what it did before
            if callable(self._previous):
                self._previous(signum, frame)
            elif self._previous != signal.SIG_IGN:
                raise KeyboardInterrupt
        elif not self._stop.is_set() and not _in_ms_logging(frame):
            raise _DeviceLost(self.lost)

    def _kill_workers(self) -> None:
        """Kill the MetaSchedule worker processes started during the job (builder, runner):
        Python would otherwise wait at exit for the builds in flight to finish."""
        import psutil

        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                ours = child.create_time() >= self._started
                if ours and "tvm.exec.popen_worker" in child.cmdline():
                    child.kill()


def _in_ms_logging(frame) -> bool:
    """Whether ``frame`` runs under MetaSchedule's logging callback, which its C++ calls from a
    destructor: an exception raised there aborts the process (std::terminate). The job is
    stopped by the next signal, a second later."""
    while frame is not None:
        if frame.f_globals.get("__name__") == "tvm.s_tir.meta_schedule.logging":
            return True
        frame = frame.f_back
    return False


def bsr_alloc_argument_rpc(session, device, args_info, alloc_repeat: int) -> list[list]:
    """`bsr_alloc_argument` for MetaSchedule's RPC runner (tensors on the remote device)."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_alloc_argument

    repeated = default_alloc_argument(session, device, args_info, alloc_repeat)
    return _valid_bsr_indices(repeated, args_info, device)


def bsr_alloc_argument(device, args_info, alloc_repeat: int) -> list[list]:
    """MetaSchedule runner arguments: random tensors, except that a BSR kernel's ``indices`` and
    ``indptr`` describe a valid block structure (its stored blocks spread evenly over the
    block-rows, distinct ascending column blocks), so the measured kernel reads in bounds."""
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument

    repeated = default_alloc_argument(device, args_info, alloc_repeat)
    return _valid_bsr_indices(repeated, args_info, device)


def _valid_bsr_indices(repeated, args_info, device) -> list[list]:
    shapes = [(str(info[1]), [int(v) for v in info[2]]) for info in args_info]
    kinds = [(dtype.startswith("int"), len(shape)) for dtype, shape in shapes]
    if kinds[:4] != [(False, 2), (False, 3), (True, 1), (True, 1)] or len(shapes) != 6:
        return repeated
    (_, (_, k)), (_, (nnzb, cols, _)) = shapes[0], shapes[1]
    block_rows, ell = shapes[3][1][0] - 1, k // cols
    counts = np.minimum(
        nnzb // block_rows + (np.arange(block_rows) < nnzb % block_rows), ell
    ).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = np.zeros(nnzb, dtype=np.int32)
    for r, count in enumerate(counts):
        spread = np.round(np.linspace(0, ell - 1, count)).astype(np.int32) if count else []
        indices[indptr[r] : indptr[r + 1]] = spread
    for args in repeated:
        args[2] = tvm.runtime.tensor(indices, device)
        args[3] = tvm.runtime.tensor(indptr, device)
    return repeated
