"""The measured search loop (`vitsparse search`) on this machine: budgets in measured latency.

For each model and latency budget (a fraction of the dense compiled model's latency, measured in
the same run), runs the search over the methods, then:

- re-measures the chosen artifact against the dense model side by side (alternating rounds);
- reports the prediction error per candidate: the cost table alone (raw) and corrected by what
  the loop measured, first candidate against last;
- runs the same search with the criteria priced in FLOPs (``priced=False``) and compares the
  quality of the two at the plans each chose (same method, same measured budget);
- compares the combined method with the best single-kind method;
- records the wall time of every search.

Searches run in ``--workdir`` (default: a directory under the system's temp dir) and resume from
their journals when the script is re-run. Writes docs/results/search_x86.{json,md,png}.

With ``--arm-emulated`` the searches run on the emulated aarch64 board (qemu-user, started
here behind a tracker on 127.0.0.1) over RPC, and write docs/results/search_arm_emulated.*:
its latencies are an emulator's, labelled so, never ARM hardware numbers.

    python benchmarks/search.py                                   # digits ViT and deit_small
    python benchmarks/search.py --models vitsparse/digits_vit --budgets 0.5
    python benchmarks/search.py --arm-emulated --models vitsparse/digits_vit --budgets 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import tvm
from tvm import relax

from vitsparse.devices.measure import Timing, measure
from vitsparse.devices.qemu import ARM_QEMU_KEY, start_arm_server
from vitsparse.devices.rpc import RpcDevice, start_tracker
from vitsparse.jobs.artifact import load_artifact
from vitsparse.jobs.compile import compile_model
from vitsparse.jobs.search import METHODS, WINDOW, search
from vitsparse.plan import PruningPlan
from vitsparse.targets import host_info, resolve_target

STEM = "search_x86"
ARM_STEM = "search_arm_emulated"
DATA = {"vitsparse/digits_vit": "digits", "deit_small_patch16_224": "synthetic"}
PRICED_METHODS = ("nvit", "lpvit", "combined")  # the ones whose plans the cost model steers
# Per model: calibration and held-out image counts, the iteration cap, and the budgets at
# which the FLOPs-priced control runs (deit_small's are cut so that the three budgets fit in
# about an hour on 2 cores; the page states them).
SETTINGS = {
    "vitsparse/digits_vit": {"calib_size": 64, "eval_size": 256, "iterations": 4},
    "deit_small_patch16_224": {
        "calib_size": 32,
        "eval_size": 128,
        "iterations": 3,
        "control": (0.5,),
    },
}
# Methods left out of a model's searches, and why (the page says so).
SKIP = {
    "deit_small_patch16_224": {
        "upvit": "UP-ViT's exact plan of deit_small (a KL leave-one-out score per channel) "
        "takes longer by itself than a whole search at one budget; see docs/architecture.md, "
        "Known gaps",
    }
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DATA), choices=list(DATA))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.35])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--iterations", type=int, help="iteration cap (default: per model)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds, chosen vs dense")
    p.add_argument("--no-flops-control", action="store_true", help="skip the priced=False runs")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vitsparse-search"))
    p.add_argument(
        "--merge",
        metavar="JSON",
        help="also report the runs of an earlier search_x86.json for the models not run now "
        "(each run keeps the command and date that produced it)",
    )
    p.add_argument(
        "--arm-emulated",
        action="store_true",
        help="search on the emulated aarch64 board over RPC (writes search_arm_emulated.*)",
    )
    _common.add_output_args(p)
    p.add_argument(
        "--render", metavar="JSON", help="only re-render the page of a suite this script wrote"
    )
    args, threads, command = _common.start(p, "search.py", argv)
    if args.render:
        suite = json.loads(Path(args.render).read_text())
        suite.setdefault("flops_control", "--no-flops-control" not in suite["command"])
        stem = Path(args.render).stem
        _common.write_suite(args.outdir, stem, suite, _markdown(suite, stem))
        _plot(suite, Path(args.outdir) / f"{stem}.png")
        return 0
    work = Path(args.workdir) / ("arm-emulated" if args.arm_emulated else "")
    runs = []
    with _arm_device() if args.arm_emulated else contextlib.nullcontext() as rpc:
        for model in args.models:
            skipped = SKIP.get(model, {})
            for fraction in args.budgets:
                control = SETTINGS[model].get("control", args.budgets)
                for priced in (True, False):
                    if not priced and (args.no_flops_control or fraction not in control):
                        continue
                    methods = [
                        m
                        for m in args.methods
                        if m not in skipped and (priced or m in PRICED_METHODS)
                    ]
                    if methods:
                        runs.append(
                            _run(model, fraction, methods, priced, args, threads, work, rpc)
                        )
    for run in runs:
        run["command"], run["date"] = command, _common.now()
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        runs += [
            {"command": earlier["command"], "date": earlier["date"], **r}
            for r in earlier["runs"]
            if r["model"] not in args.models
        ]
    suite = {
        "host": host_info(),
        "threads": threads,
        "date": _common.now(),
        "command": command,
        "window": list(WINDOW),
        "device": "rpc:arm-qemu (emulated)" if args.arm_emulated else "cpu",
        "flops_control": not args.no_flops_control,
        "skipped": {m: SKIP[m] for m in args.models if SKIP.get(m)},
        "iterations": args.iterations,
        "runs": runs,
    }
    stem = ARM_STEM if args.arm_emulated else STEM
    _common.write_suite(args.outdir, stem, suite, _markdown(suite, stem))
    _plot(suite, Path(args.outdir) / f"{stem}.png")
    return 0


@contextlib.contextmanager
def _arm_device():
    """The emulated aarch64 board behind a tracker on 127.0.0.1, as an RpcDevice."""
    tracker = start_tracker("127.0.0.1", 9391)
    try:
        address = f"127.0.0.1:{tracker.port}"
        server = start_arm_server(address, port=9491)
        try:
            yield RpcDevice(address, ARM_QEMU_KEY)
        finally:
            server.terminate()
    finally:
        tracker.terminate()


def _run(model, fraction, methods, priced, args, threads, work, rpc) -> dict:
    label = f"{model.split('/')[-1]}-{fraction:g}-{'measured' if priced else 'flops'}"
    out = work / label
    _common.say(f"== {label}: {', '.join(methods)}")
    began = time.time()
    replayed = (out / "journal.jsonl").exists()
    try:
        report = search(
            model,
            budget=f"latency={fraction}",
            out=out,
            target="arm" if rpc is not None else "x86",
            rpc=rpc,
            methods=methods,
            data=DATA[model],
            iterations=args.iterations or SETTINGS[model]["iterations"],
            calib_size=SETTINGS[model]["calib_size"],
            eval_size=SETTINGS[model]["eval_size"],
            threads=threads,
            priced=priced,
            progress=_common.say,
        )
    except Exception as err:  # a failed search is a row that says why
        _common.say(f"   failed: {err}")
        return {"model": model, "fraction": fraction, "priced": priced, "error": str(err)}
    seconds = time.time() - began
    run = {
        "model": model,
        "fraction": fraction,
        "priced": priced,
        "seconds": seconds,
        "replayed": replayed,
        "limit_ms": report.limit,
        "dense_ms": report.dense["measured"],
        "candidates": report.candidates,
        "chosen": report.chosen,
        "notes": report.notes,
        "out": str(out),
    }
    if priced:
        run["side_by_side"] = (
            _side_by_side(model, out, args.rounds)
            if rpc is None
            else _side_by_side_rpc(model, out, args.rounds, rpc)
        )
    return run


def _side_by_side(model, out: Path, rounds: int) -> dict:
    """The chosen artifact (loaded from disk, as a user would) and a fresh dense compile, timed
    in alternating rounds on the same thread pool."""
    dense = compile_model(model)
    manifest, chosen = load_artifact(out / "artifact")
    x = np.random.default_rng(0).standard_normal(dense.input_shape).astype(np.float32)
    timers = {"dense": _vm_timer(dense.executable, x), "chosen": _vm_timer(chosen, x)}
    return _alternated(timers, rounds, manifest.get("plan"))


def _alternated(timers: dict, rounds: int, plan) -> dict:
    """Median ms of the ``dense`` and ``chosen`` timers over ``rounds`` alternating rounds."""
    med = {k: statistics.median(v) for k, v in _common.alternate(timers, rounds).items()}
    return {
        "dense_ms": med["dense"],
        "chosen_ms": med["chosen"],
        "rounds": rounds,
        "ratio": med["chosen"] / med["dense"],
        "plan": plan,
    }


def _side_by_side_rpc(model, out: Path, rounds: int, rpc: RpcDevice) -> dict:
    """The chosen plan (its plan.json) and dense, compiled for aarch64 and measured on the
    board over RPC in alternating rounds."""
    spec = resolve_target("arm")
    plan = PruningPlan.load(out / "plan.json")
    compiled = {"dense": compile_model(model, target="arm"), "chosen": None}
    compiled["chosen"] = compile_model(model, target="arm", plan=plan)
    x = np.random.default_rng(0).standard_normal(compiled["dense"].input_shape)
    x = x.astype(np.float32)
    timing = Timing(repeat=3, number=5, warmup=1)

    def timer(name):
        return lambda: (
            measure(compiled[name].executable, spec, [x], rpc=rpc, timing=timing).latency.median_ms
        )

    return _alternated({k: timer(k) for k in compiled}, rounds, plan.method)


def _vm_timer(module, x: np.ndarray):
    """A function timing one sample (20 runs, after a warm-up) of ``module``'s ``main``."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(module, dev)
    arg = tvm.runtime.tensor(x, dev)
    vm["main"](arg)
    timer = vm.time_evaluator("main", dev, number=20, repeat=1)
    return lambda: timer(arg).median * 1e3


def _err(c: dict, key: str) -> float:
    return 100 * (c[key] / c["measured"] - 1)


def _quality(c: dict | None) -> str:
    if c is None:
        return "-"
    top1 = "" if c.get("top1") is None else f"top-1 {100 * c['top1']:.1f}%, "
    return f"{top1}agreement {100 * c['agreement']:.1f}%, KL {c['mean_kl']:.4f}"


def _ms(c: dict | None) -> str:
    return "-" if c is None else f"{c['measured']:.3f}"


def _score(c: dict) -> tuple:
    top1 = c.get("top1")
    return (-1.0 if top1 is None else top1, c["agreement"], -c["mean_kl"])


def _markdown(suite: dict, stem: str) -> str:
    host = suite["host"]
    emulated = suite["device"] != "cpu"
    title = "on the emulated ARM board (qemu-user, over RPC)" if emulated else "on x86"
    lines = [
        f"# The measured search loop {title}",
        "",
        _common.host_line(host, f"{suite['threads']} threads; date {suite['date']}; batch 1"),
        "- budgets: latency as a fraction of the dense compiled model's, measured in the same "
        f"run; the loop stops a method when a measurement lands in {suite['window']} of it",
        "- digits ViT: accuracy on the digits test split; deit_small: timm's random init drawn "
        "from seed 0 (`--weights-seed`), so only fidelity to the dense model (top-1 agreement, "
        "KL) on synthetic images means anything",
        "- prediction error: (predicted - measured) / measured; raw = the cost table alone, "
        "corrected = with what the loop had measured before that candidate",
    ]
    if emulated:
        lines.append(
            "- device: `rpc:arm-qemu (emulated)`, an aarch64 TVM runtime under qemu-user on this "
            "host, compiled here for aarch64+NEON. **Every latency on this page is an "
            "emulator's**: it shows the loop working over RPC, not ARM hardware speed"
        )
    lines += [
        f"- {m}: {v['calib_size']} calibration images, {v['eval_size']} held-out, at most "
        f"{suite.get('iterations') or v['iterations']} candidates per method; "
        + (
            "no FLOPs control"
            if not suite.get("flops_control", True)
            else "FLOPs control at "
            + (", ".join(f"{b:g}" for b in v["control"]) if "control" in v else "every budget")
        )
        for m, v in SETTINGS.items()
        if any(r["model"] == m for r in suite["runs"])
    ]
    lines += [
        f"- not searched on {m}: {', '.join(f'{k} ({v})' for k, v in why.items())}"
        for m, why in suite.get("skipped", {}).items()
    ]
    commands = list(dict.fromkeys(r.get("command", suite["command"]) for r in suite["runs"]))
    if len(commands) == 1:
        lines += _common.reproduce_block(commands[0])
    else:
        for c in commands:
            models = sorted({r["model"] for r in suite["runs"] if r.get("command") == c})
            dates = sorted({r["date"] for r in suite["runs"] if r.get("command") == c})
            lines += [f"- {', '.join(models)} (run {dates[0][:16]}):"]
            lines += ["", "```", c, "```", ""]
    measured = [r for r in suite["runs"] if r.get("priced") and "error" not in r]
    failed = [r for r in suite["runs"] if "error" in r]
    lines += [
        "## Chosen plan, re-measured side by side with dense",
        "",
        "| model | budget | budget ms | dense ms | chosen ms (side by side) | ratio | inside | "
        "chosen | quality | search wall time |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in measured:
        s, c = r["side_by_side"], r["chosen"]
        lines.append(
            f"| {r['model']} | {r['fraction']:g} | {r['limit_ms']:.3f} | {s['dense_ms']:.3f} | "
            f"{s['chosen_ms']:.3f} | {s['ratio']:.3f} | "
            f"{'yes' if s['ratio'] <= r['fraction'] else 'NO'} | {c['method']} "
            f"(flops {c['kept_flops']:.2f}) | {_quality(c)} | {_wall(r)} |"
        )
    lines += [
        "",
        "Search wall time: of the run that wrote the row; a search resumed from its journal "
        "shows the time of the replay (replays are flagged only where the run recorded it, or "
        "took less than its candidates' own recorded time).",
        "",
        "## Prediction error, first candidate against last (per method)",
        "",
        "| model | budget | method | candidates | raw first | raw last | corrected first | "
        "corrected last | inside window |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    raw_all, cor_all = [], []
    for r in measured:
        for method in dict.fromkeys(c["method"] for c in r["candidates"]):
            rows = [c for c in r["candidates"] if c["method"] == method]
            raw_all += [abs(_err(c, "predicted_raw")) for c in rows]
            cor_all += [abs(_err(c, "predicted")) for c in rows]
            errors = [
                f"{_err(c, key):+.1f}%"
                for key in ("predicted_raw", "predicted")
                for c in (rows[0], rows[-1])
            ]
            lines.append(
                f"| {r['model']} | {r['fraction']:g} | {method} | {len(rows)} | "
                f"{' | '.join(errors)} | {'yes' if rows[-1]['within'] else 'no'} |"
            )
    if raw_all:
        lines += [
            "",
            f"Median absolute error over all {len(raw_all)} candidates: the cost table alone "
            f"{statistics.median(raw_all):.1f}%, corrected {statistics.median(cor_all):.1f}%.",
        ]
    lines += [
        "",
        "## Measured cost vs FLOPs: the same method planned with each, same measured budget",
        "",
        "| model | budget | method | measured-cost plan | ms | FLOPs plan | ms |",
        "|---|---:|---|---|---:|---|---:|",
    ]
    control = {
        (r["model"], r["fraction"]): r
        for r in suite["runs"]
        if not r.get("priced") and "error" not in r
    }
    for r in measured:
        other = control.get((r["model"], r["fraction"]))
        if other is None:
            continue
        for method in PRICED_METHODS:
            a = _best_under(r, method)
            b = _best_under(other, method)
            if a is None and b is None:
                continue
            lines.append(
                f"| {r['model']} | {r['fraction']:g} | {method} | {_quality(a)} | {_ms(a)} | "
                f"{_quality(b)} | {_ms(b)} |"
            )
    lines += [
        "",
        "## Combined against the best single-kind method",
        "",
        "| model | budget | combined | best single method | its quality |",
        "|---|---:|---|---|---|",
    ]
    for r in measured:
        comb = _best_under(r, "combined")
        singles = [
            c for c in r["candidates"] if c["method"] != "combined" and c["under"] and c["correct"]
        ]
        best = max(singles, key=_score, default=None)
        lines.append(
            f"| {r['model']} | {r['fraction']:g} | {_quality(comb)} | "
            f"{'-' if best is None else best['method']} | {_quality(best)} |"
        )
    notes = [f"- {r['model']} at {r['fraction']:g}: {n}" for r in measured for n in r["notes"]]
    notes += [
        f"- {r['model']} at {r['fraction']:g} ({'measured' if r['priced'] else 'flops'}):"
        f" search failed: {r['error']}"
        for r in failed
    ]
    wrong = [
        f"- {r['model']} at {r['fraction']:g} ({'measured' if r['priced'] else 'flops'}): "
        f"{c['method']} #{c['iteration']} (flops {c['kept_flops']:.3f}) compiled to an output "
        f"{c['max_abs_err']:.2e} away from PyTorch; never chosen"
        for r in suite["runs"]
        if "error" not in r
        for c in r["candidates"]
        if not c["correct"]
    ]
    notes += wrong or ["- every candidate's compiled output matched its PyTorch reference"]
    lines += ["", "## Notes from the searches", ""] + notes
    lines += ["", f"![front]({stem}.png)", ""]
    return "\n".join(lines)


def _wall(run: dict) -> str:
    """The search's wall time. A search resumed from its journal (recorded by `_run`; for older
    suites: one that took less than its candidates' own recorded seconds) replayed them, and
    the time of its first run is not known here."""
    replayed = run.get("replayed")
    if replayed is None:
        replayed = run["seconds"] < sum(c.get("seconds", 0.0) for c in run["candidates"])
    return "replayed from its journal" if replayed else f"{run['seconds'] / 60:.1f} min"


def _best_under(run: dict, method: str) -> dict | None:
    rows = [c for c in run["candidates"] if c["method"] == method and c["under"] and c["correct"]]
    return max(rows, key=_score, default=None)


def _plot(suite: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in suite["runs"] if r.get("priced") and "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in runs))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in [r for r in runs if r["model"] == model]:
            rows = [c for c in r["candidates"] if c["correct"]]
            labelled = any(c.get("top1") is not None for c in rows)
            ys = [100 * (c["top1"] if labelled else c["agreement"]) for c in rows]
            ax.scatter(
                [c["measured"] / r["dense_ms"] for c in rows],
                ys,
                s=14,
                label=f"budget {r['fraction']:g}",
            )
            ax.axvline(r["fraction"], ls="--", lw=0.8, color="gray")
        ax.set_xlabel("measured latency / dense")
        ax.set_ylabel("top-1 (%)" if model == "vitsparse/digits_vit" else "agreement (%)")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
