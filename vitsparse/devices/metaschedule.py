"""MetaSchedule's builder and runner for a device: candidates are built on this machine
(cross-compiled where the target needs it) and measured here, in worker processes, or on a
device behind an RPC tracker."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable

from vitsparse import _tvm_intrin
from vitsparse._tvm import ms
from vitsparse.devices.rpc import RpcDevice, rpc_runner
from vitsparse.devices.threads import set_num_threads
from vitsparse.targets import TargetSpec

BUILD_TIMEOUT = 120.0
RUN_TIMEOUT = 120.0


def builder_for(spec: TargetSpec):
    """A LocalBuilder for ``spec`` (exporting with its cross compiler where it has one)."""
    export = None
    if spec.cross_compiler:
        export = functools.partial(_cross_export, cross_compiler=spec.cross_compiler)
    return ms.builder.LocalBuilder(
        timeout_sec=BUILD_TIMEOUT, f_export=export, initializer=_tvm_intrin.install
    )


def runner_for(
    spec: TargetSpec,
    rpc: RpcDevice | None,
    evaluator,
    *,
    threads: int,
    alloc_local: Callable | None = None,
    alloc_rpc: Callable | None = None,
):
    """A runner measuring on this machine with ``threads`` threads, or on ``rpc``'s device;
    ``alloc_local``/``alloc_rpc`` make the arguments (MetaSchedule's ``f_alloc_argument``)."""
    if rpc is not None:
        return rpc_runner(rpc, evaluator, f_alloc_argument=alloc_rpc)
    return ms.runner.LocalRunner(
        timeout_sec=RUN_TIMEOUT,
        evaluator_config=evaluator,
        # Measure with the thread count the model runs with: a fresh worker's TVM pool
        # otherwise follows its CPU affinity, which can be a single core.
        initializer=functools.partial(set_num_threads, threads),
        f_alloc_argument=alloc_local,
    )


def _cross_export(mod, cross_compiler: str) -> str:
    """MetaSchedule builder export for a cross-compiled target (runs in a builder worker)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="vitsparse-build-"), "kernel.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path
