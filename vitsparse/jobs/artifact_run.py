"""Run a vitsparse artifact with nothing but TVM's runtime and numpy: no torch, no timm, no TVM
compiler, no vitsparse. `CompiledModel.export` copies this file into every artifact as
``run.py``; on the board:

    TVM_USE_RUNTIME_LIB=1 python run.py ARTIFACT_DIR [--input x.npy] [--output y.npy] [--time N]

or, from Python, ``from run import load; model = load("ARTIFACT_DIR"); logits = model(x)``.

``TVM_USE_RUNTIME_LIB=1`` makes the ``tvm`` package load its runtime library alone (the
compiler library may be deleted from the board's copy). The thread count is set here, before
TVM's runtime starts: TVM_NUM_THREADS if given, else every core this process may use (TVM's
own default on x86 is half of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


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
        import tvm  # after TVM_NUM_THREADS: the runtime sizes its pool once
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        self.device = tvm.cpu() if kind == "cpu" else tvm.device(kind, 0)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        self.input_shape = tuple(self.manifest["input_shape"])
        self.input_dtype = self.manifest.get("input_dtype", "float32")

    def _tensor(self, x: np.ndarray):
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if x.shape != self.input_shape:
            raise ValueError(f"input shape {x.shape}; this artifact takes {self.input_shape}")
        return self._tvm.runtime.tensor(x, self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.vm["main"](self._tensor(x))
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
