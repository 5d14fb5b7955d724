"""Latency under co-located load: vitsparse against ONNX Runtime and PyTorch while 0, 1 and 2
other processes keep the cores busy.

Every runtime runs in its own process (a worker that loads the model once, then times calls
when asked), so that one runtime's idle thread pool cannot slow another. The busy processes
are plain Python spin loops. For each model and load, the workers take turns, round after
round, each timing calls for ``--sample-seconds``; a runtime's latency at that load is the
median over rounds of its samples' medians, and its slowdown is that over its own latency on
the idle machine (load 0) measured in the same run.

Runtimes: ``vitsparse`` (the compiled model as `CompiledModel.run` runs it: vitsparse's
thread-pool settings, `vitsparse._tvm.POOL_SETTINGS`, and its pool governor,
`vitsparse.jobs.artifact_run.PoolGovernor`), ``tvm-defaults`` (the same compiled model on the
Relax VM with TVM's own pool settings: threads pinned to cores, 300000 spins before a worker
sleeps), ``onnxruntime`` and ``torch-eager``, all with ``--threads`` threads (default: every
core). ``--variant NAME:VAR=V,...`` adds the vitsparse runtime with other pool variables (and
``THREADS=N``, its own thread count), e.g. ``--variant fixed-pool:VITSPARSE_ADAPTIVE_POOL=0``.

    python benchmarks/contention.py                       # deit_tiny and deit_small, loads 0 1 2
    python benchmarks/contention.py --models deit_tiny_patch16_224 --loads 0 2

Writes docs/results/contention_x86.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

from vitsparse.targets import host_info

STEM = "contention_x86"
MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
RUNTIMES = ("vitsparse", "tvm-defaults", "onnxruntime", "torch-eager")
# TVM's own pool settings (tvm/src/runtime/thread_pool.cc, threading_backend.cc).
TVM_DEFAULTS = {"TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "300000"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sample-seconds", type=float, default=1.0)
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=V,...",
        help="also time the TVM model with these pool variables (to choose vitsparse's)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    _common.add_output_args(p)
    args, threads, command = _common.start(p, "contention.py", argv)
    if args.worker:
        return _worker(args.worker, args.model, threads)
    variants = dict(_variant(text) for text in args.variant)
    if 0 not in args.loads:
        p.error("--loads must include 0: slowdowns are relative to the idle machine")
    results = []
    for model in args.models:
        with _workers(model, args.runtimes, variants, threads) as workers:
            for load in sorted(args.loads):
                _common.say(f"== {model}: {load} busy processes")
                with _busy(load):
                    time.sleep(0.5)  # let the busy loops take the cores
                    samples = _rounds(workers, args.rounds, args.sample_seconds)
                for runtime, values in samples.items():
                    results.append(
                        {
                            "model": model,
                            "load": load,
                            "runtime": runtime,
                            "samples_ms": values,
                            "median_ms": statistics.median(values),
                        }
                    )
                    _common.say(f"   {runtime}: {statistics.median(values):.2f} ms")
    suite = {
        "host": host_info(),
        "threads": threads,
        "cores": os.cpu_count(),
        "date": _common.now(),
        "command": command,
        "rounds": args.rounds,
        "sample_seconds": args.sample_seconds,
        "pool_settings": _pool_settings(),
        "variants": variants,
        "results": results,
    }
    _common.write_suite(args.outdir, STEM, suite, _markdown(suite))
    return 0


def _pool_settings() -> dict:
    from vitsparse._tvm import POOL_SETTINGS

    return dict(POOL_SETTINGS)


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, env


@contextlib.contextmanager
def _busy(count: int):
    """``count`` processes spinning in pure Python until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@contextlib.contextmanager
def _workers(model: str, runtimes, variants: dict, threads: int):
    """One started worker process per runtime and variant (each has loaded and warmed its
    model)."""
    procs = {}
    try:
        for runtime in [*runtimes, *variants]:
            env = dict(os.environ)
            if runtime == "tvm-defaults":
                env.update(TVM_DEFAULTS)
            extra = dict(variants.get(runtime, {}))
            count = extra.pop("THREADS", threads)  # a variant's own thread count
            env.update(extra)
            kind = runtime if runtime in RUNTIMES else "vitsparse"
            cmd = [sys.executable, __file__, "--worker", kind, "--model", model]
            cmd += ["--threads", str(count)]
            _common.say(f"[contention] starting {runtime} for {model} ...")
            procs[runtime] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            line = procs[runtime].stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"the {runtime} worker did not start: {line!r}")
        yield procs
    finally:
        for proc in procs.values():
            with contextlib.suppress(Exception):
                proc.stdin.close()
            proc.wait(timeout=60)


def _rounds(workers: dict, rounds: int, seconds: float) -> dict[str, list[float]]:
    """{runtime: the median ms of each of its samples}, the runtimes taking turns."""
    out: dict[str, list[float]] = {name: [] for name in workers}
    for _ in range(rounds):
        for name, proc in workers.items():
            proc.stdin.write(f"{seconds}\n")
            proc.stdin.flush()
            times = json.loads(proc.stdout.readline())
            out[name].append(statistics.median(times))
    return out


def _worker(runtime: str, model: str, threads: int) -> int:
    """Load ``model`` for ``runtime``, say "ready", then for every line (seconds) time calls
    for that long (at least 3) and print their milliseconds as JSON."""
    run = _prepare(runtime, model, threads)
    for _ in range(3):
        run()
    print("ready", flush=True)
    for line in sys.stdin:
        budget = float(line)
        times = []
        began = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - began < budget:
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps(times), flush=True)
    return 0


def _prepare(runtime: str, model: str, threads: int):
    import numpy as np

    if runtime in ("vitsparse", "tvm-defaults"):
        from vitsparse.devices import set_num_threads
        from vitsparse.jobs.compile import compile_model

        set_num_threads(threads)
        compiled = compile_model(model)
        x = np.random.default_rng(0).standard_normal(compiled.input_shape).astype(np.float32)
        if runtime == "vitsparse":  # as a user runs it: CompiledModel.run, its pool governor
            return lambda: compiled.run(x)
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
        arg = tvm.runtime.tensor(x, tvm.cpu())
        return lambda: vm["main"](arg)
    import torch

    from vitsparse.frontend import load_torch_model

    torch_model, _ = load_torch_model(model)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if runtime == "torch-eager":
        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        return lambda: torch_model(x)
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp(prefix="vitsparse-contention-")) / "model.onnx"
    torch.onnx.export(torch_model, (x,), str(path), dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _markdown(suite: dict) -> str:
    by = {(r["model"], r["load"], r["runtime"]): r["median_ms"] for r in suite["results"]}
    models = list(dict.fromkeys(r["model"] for r in suite["results"]))
    loads = sorted({r["load"] for r in suite["results"]})
    runtimes = list(dict.fromkeys(r["runtime"] for r in suite["results"]))
    settings = ", ".join(f"{k}={v}" for k, v in suite["pool_settings"].items())
    lines = [
        "# Latency under co-located load (x86)",
        "",
        _common.host_line(
            suite["host"],
            f"{suite['threads']} threads per runtime; date {suite['date']}; batch 1; "
            "seeded random weights",
        ),
        f"- load: that many other processes spinning in pure Python on the "
        f"{suite['cores']} cores; every runtime in its own process, the runtimes taking turns "
        f"for {suite['rounds']} rounds of {suite['sample_seconds']:g} s; latency = median over "
        "rounds of each sample's median; slowdown = latency / the same runtime's at load 0",
        f"- vitsparse: `CompiledModel.run`, its pool settings ({settings}) and its pool "
        "governor (one thread while a run takes 2.5x the full pool's best); tvm-defaults: the "
        "same compiled model on the Relax VM with TVM's own pool settings (threads pinned to "
        "cores, 300000 spins before a worker sleeps)"
        + "".join(
            f"; {name}: {', '.join(f'{k}={v}' for k, v in env.items())}"
            for name, env in suite.get("variants", {}).items()
        ),
        "- goal: vitsparse's slowdown no worse than ONNX Runtime's at every load, with no loss "
        "on the idle machine",
        *_common.reproduce_block(suite["command"]),
    ]
    for model in models:
        lines += [
            f"## {model}",
            "",
            "| runtime | " + " | ".join(f"load {n}: ms (slowdown)" for n in loads) + " |",
            "|---|" + "---|" * len(loads),
        ]
        for runtime in runtimes:
            idle = by.get((model, 0, runtime))
            cells = []
            for n in loads:
                ms = by.get((model, n, runtime))
                cells.append("-" if ms is None else f"{ms:.2f} ({ms / idle:.1f}x)")
            lines.append(f"| {runtime} | " + " | ".join(cells) + " |")
        verdicts = []
        for n in loads:
            ours = by[(model, n, "vitsparse")] / by[(model, 0, "vitsparse")]
            if (model, n, "onnxruntime") in by:
                theirs = by[(model, n, "onnxruntime")] / by[(model, 0, "onnxruntime")]
                ok = "yes" if ours <= theirs else "**NO**"
                verdicts.append(f"load {n}: {ours:.1f}x vs {theirs:.1f}x ({ok})")
        idle_ratio = (
            by[(model, 0, "vitsparse")] / by[(model, 0, "tvm-defaults")]
            if (model, 0, "tvm-defaults") in by
            else None
        )
        lines += [
            "",
            "- vitsparse's slowdown vs ONNX Runtime's, no worse? " + "; ".join(verdicts),
        ]
        if idle_ratio is not None:
            lines.append(
                f"- idle machine: vitsparse / tvm-defaults = {idle_ratio:.3f} "
                f"({'no loss' if idle_ratio <= 1.03 else '**a loss**'}, 3% tolerance)"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
