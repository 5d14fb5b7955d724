"""How many threads TVM's runtime runs compiled models with.

Every core this process may use (its CPU affinity), unless the user chose a count: the
``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS`` variable, ``--threads``, or `set_num_threads`.
`vitsparse._tvm` sets that default before TVM's pool exists (the pool reads it once and can
shrink later but never grow); `configure_threads` applies the chosen count where code runs and
warns when a pool started before vitsparse could size it is smaller.
"""

from __future__ import annotations

import os
import warnings

from vitsparse._tvm import THREAD_VARIABLES, available_cores, tvm

__all__ = ["available_cores", "chosen_threads", "configure_threads", "set_num_threads"]


def chosen_threads() -> int:
    """The thread count in effect for this process: the environment's (the user's, or
    vitsparse's default), else every available core."""
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return available_cores()


def set_num_threads(threads: int) -> None:
    """Run TVM's CPU thread pool with ``threads`` threads (at most as many as the pool was
    started with); child processes inherit the count."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    # mode 1 = "big cores"; the pool is re-created with `threads` workers.
    tvm.get_global_func("runtime.config_threadpool")(1, threads)


def configure_threads() -> int:
    """Make TVM's pool run `chosen_threads`; the count it runs. Warns (once) when the pool was
    started, before vitsparse was imported, with fewer threads than that."""
    threads = chosen_threads()
    if _pool_size() != threads:
        set_num_threads(threads)
    running = _pool_size()
    if running < threads:
        warnings.warn(
            f"TVM's thread pool runs {running} of the {threads} threads wanted: it was started "
            "before vitsparse could size it; set TVM_NUM_THREADS before starting Python",
            RuntimeWarning,
            stacklevel=2,
        )
    return running


def _pool_size() -> int:
    return int(tvm.get_global_func("runtime.NumThreads")())
