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

    python benchmarks/search.py                                   # digits ViT and deit_small
    python benchmarks/search.py --models vitsparse/digits_vit --budgets 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import tvm
from tvm import relax

from vitsparse.jobs.artifact import load_artifact
from vitsparse.jobs.compile import compile_model
from vitsparse.jobs.search import METHODS, WINDOW, search
from vitsparse.targets import host_info

STEM = "search_x86"
DATA = {"vitsparse/digits_vit": "digits", "deit_small_patch16_224": "synthetic"}
PRICED_METHODS = ("nvit", "lpvit", "combined")  # the ones whose plans the cost model steers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DATA), choices=list(DATA))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.35])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds, chosen vs dense")
    p.add_argument("--no-flops-control", action="store_true", help="skip the priced=False runs")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vitsparse-search"))
    _common.add_output_args(p)
    args, threads, command = _common.start(p, "search.py", argv)
    work = Path(args.workdir)
    runs = []
    for model in args.models:
        for fraction in args.budgets:
            for priced in (True, False):
                if not priced and args.no_flops_control:
                    continue
                methods = (
                    args.methods if priced else [m for m in args.methods if m in PRICED_METHODS]
                )
                if not methods:
                    continue
                runs.append(_run(model, fraction, methods, priced, args, threads, work))
    suite = {
        "host": host_info(),
        "threads": threads,
        "date": _common.now(),
        "command": command,
        "window": list(WINDOW),
        "runs": runs,
    }
    _common.write_suite(args.outdir, STEM, suite, _markdown(suite))
    _plot(suite, Path(args.outdir) / f"{STEM}.png")
    return 0


def _run(model, fraction, methods, priced, args, threads, work) -> dict:
    label = f"{model.split('/')[-1]}-{fraction:g}-{'measured' if priced else 'flops'}"
    out = work / label
    _common.say(f"== {label}: {', '.join(methods)}")
    began = time.time()
    try:
        report = search(
            model,
            budget=f"latency={fraction}",
            out=out,
            methods=methods,
            data=DATA[model],
            iterations=args.iterations,
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
        "limit_ms": report.limit,
        "dense_ms": report.dense["measured"],
        "candidates": report.candidates,
        "chosen": report.chosen,
        "notes": report.notes,
        "out": str(out),
    }
    if priced:
        run["side_by_side"] = _side_by_side(model, out, args.rounds)
    return run


def _side_by_side(model, out: Path, rounds: int) -> dict:
    """The chosen artifact (loaded from disk, as a user would) and a fresh dense compile, timed
    in alternating rounds on the same thread pool."""
    dense = compile_model(model)
    manifest, chosen = load_artifact(out / "artifact")
    x = np.random.default_rng(0).standard_normal(dense.input_shape).astype(np.float32)
    timers = {"dense": _vm_timer(dense.executable, x), "chosen": _vm_timer(chosen, x)}
    samples = _common.alternate(timers, rounds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "dense_ms": med["dense"],
        "chosen_ms": med["chosen"],
        "rounds": rounds,
        "ratio": med["chosen"] / med["dense"],
        "plan": manifest.get("plan"),
    }


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


def _markdown(suite: dict) -> str:
    host = suite["host"]
    lines = [
        "# The measured search loop on x86",
        "",
        _common.host_line(host, f"{suite['threads']} threads; date {suite['date']}; batch 1"),
        "- budgets: latency as a fraction of the dense compiled model's, measured in the same "
        f"run; the loop stops a method when a measurement lands in {suite['window']} of it",
        "- digits ViT: accuracy on the digits test split; deit_small: random weights (seeded by "
        "timm's init), fidelity to the dense model on synthetic images",
        "- prediction error: (predicted - measured) / measured; raw = the cost table alone, "
        "corrected = with what the loop had measured before that candidate",
    ]
    lines += _common.reproduce_block(suite["command"])
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
            f"(flops {c['kept_flops']:.2f}) | {_quality(c)} | {r['seconds'] / 60:.1f} min |"
        )
    lines += [
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
    if notes:
        lines += ["", "## Notes from the searches", ""] + notes
    lines += ["", "![front](search_x86.png)", ""]
    return "\n".join(lines)


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
