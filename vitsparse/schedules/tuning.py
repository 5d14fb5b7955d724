"""The tuning engine: the distinct kernels of a model, their hand-written schedules as tuning
records, and MetaSchedule's search over the rest of the budget.

The dense and block-sparse kernels are searched in their own templates' spaces (the same
templates as the hand-written schedules, with their knobs sampled), every other kernel in
MetaSchedule's default space for the target. A block-sparse kernel reads index arrays, so its
measurements get a valid block structure (`kernel_arguments`, `bsr_alloc_argument`) instead of
random bits. Building and measuring belong to the caller (`vitsparse.jobs.tune`), which passes
the builder and runner of its device.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vitsparse import _tvm_intrin
from vitsparse._tvm import IRModule, ms, relax, structural_hash, tir, tvm
from vitsparse.schedules import bsr, cpu_rules, dense, paired

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
    def is_paired_dense(self) -> bool:
        return paired.is_dense_kernel(self.func)

    @property
    def takes_indices(self) -> bool:
        """Whether an input is an index buffer the runner cannot fill validly (gathers and the
        like; the BSR kernel's indices it can, and a paired dense kernel's int32 input is its
        offset's compensation, which any values time)."""
        if self.is_bsr or self.is_paired_dense:
            return False
        return any(str(p.dtype) in ("int32", "int64") for p in self.func.params[:-1])

    def workload(self) -> IRModule:
        return IRModule({"main": self.func.with_attr("global_symbol", "main")})


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
    if kernel.is_dense or kernel.is_paired_dense:
        template = dense.schedule_dense_cpu if kernel.is_dense else paired.schedule_dense_cpu
        return ms.space_generator.ScheduleFn(
            lambda sch: template(sch, None),
            sch_rules=[],
            postprocs=[],
            mutator_probs={ms.mutator.MutateTileSize(): 1.0},
        )
    return "post-order-apply"


def hand_schedule(kernel: Kernel, target):
    """The schedule the hand-written rules give ``kernel`` (None where none applies)."""
    func = kernel.workload()["main"]
    for rule in cpu_rules.default_rules():
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch
    return None


def commit_record(database, kernel: Kernel, sch, seconds, target) -> None:
    """Commit ``sch`` of ``kernel``, measured at ``seconds`` (samples), to ``database``."""
    workload = database.commit_workload(kernel.workload())
    database.commit_tuning_record(
        ms.database.TuningRecord(
            sch.trace,
            workload,
            [float(s) for s in seconds],
            target,
            ms.arg_info.ArgInfo.from_prim_func(kernel.workload()["main"]),
        )
    )


def kernel_records(database, kernel: Kernel) -> list:
    """Every record ``database`` holds of ``kernel``, best first."""
    workload_mod = kernel.workload()
    if not database.has_workload(workload_mod):
        return []
    workload = database.commit_workload(workload_mod)
    return list(database.get_top_k(workload, 1 << 20))


def best_ms(found: list) -> float | None:
    """The fastest mean run time (ms) among tuning records, or None."""
    times = [sum(float(v) for v in r.run_secs) / len(r.run_secs) for r in found if r.run_secs]
    return min(times) * 1e3 if times else None


def search(
    kernels: list[Kernel],
    target,
    database,
    trials: int,
    *,
    builder,
    runner,
    say: Callable[[str], None],
) -> None:
    """MetaSchedule's search: ``trials`` trials over ``kernels`` (weighted by their calls),
    each measured batch committed to ``database``."""
    _tvm_intrin.load(target.kind.name)  # what MetaSchedule's default rules tensorize with
    contexts = [
        ms.TuneContext(
            mod=k.workload(),
            target=target,
            space_generator=_space(k, target),
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
            max_trials_global=trials,
            max_trials_per_task=max(trials // len(kernels) * 2, TRIALS_PER_ROUND),
            num_trials_per_iter=TRIALS_PER_ROUND,
            builder=builder,
            runner=runner,
            database=database,
            cost_model="xgb",
            measure_callbacks="default",
            task_scheduler=CommitEachBatch([float(k.calls) for k in kernels]).scheduler(),
        )


class CommitEachBatch:
    """MetaSchedule's tuning loop with every measured batch in the database before the next
    batch is sent, so a tune killed at any moment loses at most the batch in flight.

    MetaSchedule's own schedulers join (measure, then commit to the database) a kernel's batch
    only when they come back to that kernel; the gradient scheduler first sends one batch of
    every kernel, so a model of 20 kernels commits nothing until 20 batches have run. Here the
    batch just sent is joined before the next kernel is picked, weighted round-robin: the kernel
    with the fewest batches per unit of weight (its calls per inference) goes next.

    ``scheduler()`` is the TVM object to pass as ``task_scheduler``: a PyTaskScheduler with
    only ``next_task_id`` in Python (joining and the tuning loop stay MetaSchedule's; a Python
    ``join_running_task`` would call itself through TVM's virtual dispatch)."""

    def __init__(self, weights: list[float]):
        self.weights = [max(w, 1e-9) for w in weights]
        self.sent = [0] * len(weights)
        self.last: int | None = None
        self._scheduler = None

    def scheduler(self):
        cls = ms.task_scheduler.task_scheduler._PyTaskScheduler
        self._scheduler = cls(self.next_task_id, None, None)
        return self._scheduler

    def next_task_id(self) -> int:
        tasks = self._scheduler.tasks_
        if self.last is not None and not tasks[self.last].is_terminated:
            self._scheduler.join_running_task(self.last)  # committed before the next send
        live = [i for i, t in enumerate(tasks) if not t.is_terminated]
        if not live:
            self.last = None
            return -1
        pick = min(live, key=lambda i: (self.sent[i] / self.weights[i], i))
        self.sent[pick] += 1
        self.last = pick
        return pick


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


def kernel_arguments(kernel: Kernel, seed: int = 0) -> list[np.ndarray]:
    """Arguments to measure ``kernel`` with, as numpy arrays: random floats, zero integers,
    except that a BSR kernel's ``indices`` and ``indptr`` hold a valid block structure."""
    rng = np.random.default_rng(seed)
    infos = ms.arg_info.ArgInfo.from_prim_func(kernel.workload()["main"])
    args = []
    for info in infos:
        dtype, shape = str(info.dtype), [int(v) for v in info.shape]
        if dtype.startswith(("int", "uint")):
            args.append(np.zeros(shape, dtype=dtype))
        else:
            args.append(rng.standard_normal(shape).astype(dtype))
    structure = _bsr_structure([(str(i.dtype), [int(v) for v in i.shape]) for i in infos])
    if structure is not None:
        args[2], args[3] = structure
    return args


def _bsr_structure(shapes: list[tuple[str, list[int]]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, indptr) of a valid block structure for a BSR kernel's arguments, given as
    (dtype, shape) per argument (None for any other kernel): its stored blocks spread evenly
    over the block-rows, distinct ascending column blocks."""
    kinds = [(dtype.startswith("int"), len(shape)) for dtype, shape in shapes]
    if kinds[:4] != [(False, 2), (False, 3), (True, 1), (True, 1)] or len(shapes) != 6:
        return None
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
    return indices, indptr


def _valid_bsr_indices(repeated, args_info, device) -> list[list]:
    structure = _bsr_structure([(str(info[1]), [int(v) for v in info[2]]) for info in args_info])
    if structure is None:
        return repeated
    indices, indptr = structure
    for args in repeated:
        args[2] = tvm.runtime.tensor(indices, device)
        args[3] = tvm.runtime.tensor(indptr, device)
    return repeated
