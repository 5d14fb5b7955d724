"""Run a vitsparse artifact with nothing but TVM's runtime and numpy: no torch, no timm, no TVM
compiler, no vitsparse. `CompiledModel.export` copies this file into every artifact as
``run.py``; on the board:

    TVM_USE_RUNTIME_LIB=1 python run.py ARTIFACT_DIR [--input x.npy] [--output y.npy] [--time N]

or, from Python, ``from run import load; model = load("ARTIFACT_DIR"); logits = model(x)``.

``TVM_USE_RUNTIME_LIB=1`` makes the ``tvm`` package load its runtime library alone (the
compiler library may be deleted from the board's copy). The thread count is set here, before
TVM's runtime starts: TVM_NUM_THREADS if given, else every core this process may use (TVM's
own default on x86 is half of them); so are the pool's settings, `POOL_SETTINGS`. Each call
runs under a `PoolGovernor`: one thread while other processes keep the cores busy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
# vitsparse's thread-pool settings (vitsparse._tvm.POOL_SETTINGS, copied: this file imports
# nothing of vitsparse): pool threads that do not pin themselves to a core, so that a thread
# whose core another process holds can move to a free one.
POOL_SETTINGS = {"TVM_BIND_THREADS": "0"}


class PoolGovernor:
    """Runs inferences on the full thread pool while the cores are free, on one thread while
    other processes keep them busy.

    TVM's idle pool threads yield in a loop before they sleep; when every core is taken by
    other processes each yield hands a core away for a whole time slice, and a two-thread
    inference becomes tens of times slower (docs/results/contention_x86.md). One thread needs no
    pool. So: a run slower than ``SLOW`` times the full pool's best shrinks the pool to one
    thread; after ``retry`` seconds one run tries the full pool again, and the wait doubles (to
    ``RETRY[1]``) each time the cores are still busy. ``configure(n)`` sizes the pool.
    ``VITSPARSE_ADAPTIVE_POOL=0`` turns the governor off."""

    SLOW = 2.5
    RETRY = (2.0, 60.0)

    def __init__(self, threads: int, configure, clock=None):
        import time

        self.full, self.configure = threads, configure
        self.clock = clock or time.perf_counter
        self.enabled = threads > 1 and os.environ.get("VITSPARSE_ADAPTIVE_POOL", "1") != "0"
        self.best = None  # the full pool's fastest run, seconds
        self.single = False
        self.retry_at = 0.0
        self.wait = self.RETRY[0]

    def run(self, fn):
        """``fn()`` timed, the pool resized for the next run where the timing says so."""
        if not self.enabled:
            return fn()
        probing = self.single and self.clock() >= self.retry_at
        if probing:
            self.configure(self.full)
            self.single = False
        start = self.clock()
        out = fn()
        seconds = self.clock() - start
        if self.single:
            return out
        if self.best is None or seconds < self.best:
            self.best = seconds
        if seconds > self.SLOW * self.best:  # other processes hold the cores
            self.configure(1)
            self.single = True
            self.wait = min(2 * self.wait, self.RETRY[1]) if probing else self.RETRY[0]
            self.retry_at = self.clock() + self.wait
        return out


class Model:
    """A loaded artifact: ``model(x)`` runs it on a float32 array of ``input_shape``."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a vitsparse artifact")
        self.manifest = json.loads(manifest_path.read_text())
        library = directory / self.manifest["library"]
        if not library.is_file():
            raise FileNotFoundError(f"{directory}: library {library.name} is missing")
        kind = self.manifest.get("target", {}).get("device_type", "cpu")
        if kind == "cpu" and not os.environ.get("TVM_NUM_THREADS"):
            cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
            os.environ["TVM_NUM_THREADS"] = str(len(cores) if cores else os.cpu_count() or 1)
        for name, value in POOL_SETTINGS.items():  # where the user set nothing
            os.environ.setdefault(name, value)
        import tvm  # after TVM_NUM_THREADS: the runtime sizes its pool once
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        self.device = tvm.cpu() if kind == "cpu" else tvm.device(kind, 0)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        self.input_shape = tuple(self.manifest["input_shape"])
        self.input_dtype = self.manifest.get("input_dtype", "float32")
        threads = int(tvm.get_global_func("runtime.NumThreads")()) if kind == "cpu" else 1
        resize = tvm.get_global_func("runtime.config_threadpool")
        self.governor = PoolGovernor(threads, lambda n: resize(1, n))

    def _tensor(self, x: np.ndarray):
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if x.shape != self.input_shape:
            raise ValueError(f"input shape {x.shape}; this artifact takes {self.input_shape}")
        return self._tvm.runtime.tensor(x, self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        arg = self._tensor(x)
        out = self.governor.run(lambda: self.vm["main"](arg))
        if not hasattr(out, "numpy"):  # a tuple of outputs: the logits come first
            out = out[0]
        return out.numpy()

    def time_ms(self, x: np.ndarray, runs: int) -> float:
        """The median of ``runs`` timed runs, in ms, after one warm-up."""
        arg = self._tensor(x)
        self.vm["main"](arg)
        timer = self.vm.time_evaluator("main", self.device, number=1, repeat=runs)
        return float(np.median(timer(arg).results) * 1e3)


def load(directory: str | os.PathLike) -> Model:
    return Model(directory)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run a vitsparse artifact on TVM's runtime alone.")
    p.add_argument("artifact", nargs="?", default=str(Path(__file__).resolve().parent))
    p.add_argument("--input", help=".npy input (default: seeded random, the artifact's shape)")
    p.add_argument("--output", help="write the logits here (.npy)")
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time N runs")
    args = p.parse_args(argv)
    try:
        model = load(args.artifact)
        if args.input:
            x = np.load(args.input)
        else:
            x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
        y = model(x)
    except (OSError, ValueError) as err:  # a missing artifact or input, a wrong input shape
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    print(f"model     {model.manifest.get('model')} on {model.device}")
    print(f"output    {y.shape} {y.dtype}; top-1 of the first image: {int(y[0].argmax())}")
    if args.output:
        np.save(args.output, y)
    if args.time:
        threads = os.environ.get("TVM_NUM_THREADS", "?")
        print(
            f"latency   {model.time_ms(x, args.time):.3f} ms (median of {args.time}, "
            f"{threads} threads)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
