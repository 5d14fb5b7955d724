"""Reduced precision, side by side: vitsparse in every precision this host compiles (fp32,
int8, and bf16 where the CPU has avx512_bf16; the others are listed with the reason the target
refuses them), dense, with a 50% block plan and with a heads+MLP plan, against PyTorch, ONNX
Runtime (fp32 and its own static int8) and OpenVINO (fp32 and its default precision on this
CPU), at batch 1 and 8.

For each (model, batch) every runtime is prepared first (one compile per precision and plan),
then all are timed in the same alternating rounds (`vitsparse.jobs.bench_runtimes`): one sample
of each per round, a pause between runtimes. Each vitsparse row is checked against the PyTorch
model of the same computation (the plan applied; int8: the same scales, fake-quantized; bf16:
inputs and weights rounded to bf16); the peers against fp32 PyTorch. The page states the
issue's goals and whether each is met, and each precision's most expensive kernels (deit_tiny,
dense, batch 1).

Accuracy: the digits ViT's top-1 on its test split and deit_tiny's agreement with fp32 PyTorch
(seeded random weights, synthetic images), per precision and plan, from the compiled models.

    python benchmarks/precision.py                                  # the full matrix
    python benchmarks/precision.py --models deit_tiny_patch16_224 --batches 1

Writes docs/results/precision_x86.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch

from vitsparse.data.sources import load_images
from vitsparse.devices import Timing
from vitsparse.frontend import import_model
from vitsparse.jobs._inputs import resolve_inputs
from vitsparse.jobs.bench_runtimes import RUNNERS, pruned_torch_model, torch_output
from vitsparse.jobs.bench_session import Contender, Session, time_alternating
from vitsparse.jobs.compile import compile_model
from vitsparse.plan import apply_plan_to_torch
from vitsparse.plan.quantize import reference_model
from vitsparse.pruning.block_mask import block_mask_plan
from vitsparse.pruning.compose import compose_plan
from vitsparse.pruning.fractions import structure_plan
from vitsparse.targets import PRECISIONS, check_precision, host_info, resolve_target

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
PEERS = ("torch-eager", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-default")
PLANS = ("dense", "blocks50", "heads+mlp")
CALIB, CALIB_SIZE = "synthetic", 16
GOALS = (  # (name, faster row, slower row, factor) at batch 1: the faster row's speedup
    ("int8 dense >= 1.3x OpenVINO default", "int8 dense", "openvino-default", 1.3),
    ("int8 + 50% blocks >= 2.5x OpenVINO default", "int8 blocks50", "openvino-default", 2.5),
    ("int8 + 50% blocks >= 4x vitsparse fp32 dense", "int8 blocks50", "fp32 dense", 4.0),
    ("bf16 dense >= OpenVINO default", "bf16 dense", "openvino-default", 1.0),
)


def make_plan(model, name: str, model_id: str):
    if name == "dense":
        return None
    if name == "blocks50":
        return block_mask_plan(model, model_id=model_id, block=(16, 16), keep=0.5)
    structure = structure_plan(model, heads=0.5, mlp=0.5)
    return compose_plan(model, model_id=model_id, method="magnitude", structure=structure)


def precisions_here() -> tuple[list[str], dict[str, str]]:
    """(the precisions the x86 target compiles here, the others with the reason they do not)."""
    spec = resolve_target("x86")
    ok, refused = [], {}
    for precision in PRECISIONS:
        try:
            check_precision(spec, precision)
            ok.append(precision)
        except Exception as err:  # noqa: BLE001 - the refusal is the result
            refused[precision] = str(err)
    return ok, refused


def _session(imported, x, threads, timing, inputs, tmpdir, plan):
    session = Session(
        imported=imported,
        x=x,
        threads=threads,
        timing=timing,
        inputs=inputs,
        say=_common.say,
        tmpdir=tmpdir,
        pruned_model=None if plan is None else pruned_torch_model(imported, plan),
        energy_seconds=0.0,
    )
    session.reference = torch_output(session, imported.torch_model)
    if plan is not None:
        session.pruned_reference = torch_output(session, session.pruned_model)
    return session


def _renamed(contender: Contender, name: str) -> Contender:
    def finish(latency):
        return dataclasses.replace(contender.finish(latency), runtime=name)

    return Contender(name, contender.call, finish, contender.scope)


def measure_batch(model_id: str, batch: int, precisions, args, threads: int) -> dict:
    imported = import_model(model_id, batch=batch)
    x = np.random.default_rng(0).standard_normal(imported.input_shape, dtype=np.float32)
    timing = Timing(args.repeat, args.number, 2)
    plans = {name: make_plan(imported.torch_model, name, model_id) for name in PLANS}
    with tempfile.TemporaryDirectory(prefix="vitsparse-precision-") as tmp:
        tmpdir = Path(tmp)
        base_inputs = resolve_inputs(target="x86")
        base = _session(imported, x, threads, timing, base_inputs, tmpdir, None)
        prepared = []
        for peer in PEERS:
            _common.say(f"[precision] {model_id} batch {batch}: preparing {peer}")
            prepared.append(RUNNERS[peer](base))
        for precision in precisions:
            for plan_name, plan in plans.items():
                name = f"{precision} {plan_name}"
                _common.say(f"[precision] {model_id} batch {batch}: compiling {name}")
                inputs = resolve_inputs(
                    target="x86",
                    precision=precision,
                    calib=CALIB if precision == "int8" else None,
                    calib_size=CALIB_SIZE,
                )
                inputs = dataclasses.replace(inputs, plan=plan)
                session = _session(imported, x, threads, timing, inputs, tmpdir, plan)
                runner = RUNNERS["tvm-dense" if plan is None else "tvm-pruned"]
                made = runner(session)
                prepared.append(_renamed(made, name) if isinstance(made, Contender) else made)
        contenders = [p for p in prepared if isinstance(p, Contender)]
        _common.say(f"[precision] timing {len(contenders)} runtimes in alternating rounds")
        timed = iter(time_alternating(contenders, timing, _common.say))
        rows = [next(timed) if isinstance(p, Contender) else p for p in prepared]
    return {"model": model_id, "batch": batch, "rows": [r.to_json() for r in rows]}


def _digits_accuracy(precisions) -> list[dict]:
    """Top-1 of the compiled digits ViT on the digits test split, per precision and plan."""
    name = "vitsparse/digits_vit"
    model = import_model(name).torch_model
    data = load_images("digits", image_size=32)
    out = []
    for precision in precisions:
        for plan_name in PLANS:
            plan = make_plan(model, plan_name, name)
            compiled = compile_model(
                name, plan=plan, precision=precision, calib="digits-train", calib_size=64
            )
            logits = np.concatenate([compiled.run(img[None].numpy()) for img in data.images])
            top1 = float((logits.argmax(1) == data.labels.numpy()).mean())
            out.append({"precision": precision, "plan": plan_name, "top1": top1})
            _common.say(f"[precision] digits {precision} {plan_name}: top-1 {top1:.4f}")
    return out


def _deit_fidelity(precisions, images: int) -> list[dict]:
    """deit_tiny's top-1 agreement with fp32 PyTorch, and its error against its own reference
    (mean |err|), per precision and plan, on seeded synthetic images."""
    name = "deit_tiny_patch16_224"
    model = import_model(name).torch_model
    xs = torch.randn((images, 3, 224, 224), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        dense_top1 = model(xs).argmax(1).numpy()
    out = []
    for precision in precisions:
        for plan_name in PLANS:
            plan = make_plan(model, plan_name, name)
            compiled = compile_model(
                name, plan=plan, precision=precision, calib=CALIB, calib_size=CALIB_SIZE
            )
            base = model if plan is None else apply_plan_to_torch(model, plan)
            base = reference_model(base, precision, compiled.quantization)
            logits = np.concatenate([compiled.run(x[None].numpy()) for x in xs])
            with torch.no_grad():
                reference = base(xs).numpy()
            agreement = float((logits.argmax(1) == dense_top1).mean())
            out.append(
                {
                    "precision": precision,
                    "plan": plan_name,
                    "agreement": agreement,
                    "mean_abs_err_vs_reference": float(np.abs(logits - reference).mean()),
                }
            )
            _common.say(f"[precision] deit_tiny {precision} {plan_name}: agreement {agreement}")
    return out


def _profile(precision: str) -> list[dict]:
    compiled = compile_model(
        "deit_tiny_patch16_224", precision=precision, calib=CALIB, calib_size=CALIB_SIZE
    )
    x = np.random.default_rng(0).standard_normal(compiled.input_shape, dtype=np.float32)
    return [k.to_json() for k in compiled.profile(x, runs=10)[:10]]


# -- the page -----------------------------------------------------------------------------------


def _median(row: dict) -> float | None:
    latency = row.get("latency_ms")
    return None if latency is None else latency["median"]


def _goal_lines(runs: list[dict], refused: dict) -> list[str]:
    lines = ["| goal | model | measured | met |", "|---|---|---|---|"]
    for goal, fast, slow, factor in GOALS:
        for run in runs:
            if run["batch"] != 1:
                continue
            rows = {r["runtime"]: r for r in run["rows"]}
            precision = fast.split()[0]
            if precision in refused:
                reason = refused[precision]
                lines.append(f"| {goal} | {run['model']} | refused here: {reason} | - |")
                continue
            a, b = _median(rows.get(fast, {})), _median(rows.get(slow, {}))
            if a is None or b is None:
                lines.append(f"| {goal} | {run['model']} | not measured | - |")
                continue
            ratio = b / a
            met = "yes" if ratio >= factor else "**no**"
            lines.append(f"| {goal} | {run['model']} | {ratio:.2f}x | {met} |")
    return lines


def render(suite: dict) -> str:
    host = suite["host"]
    lines = [
        "# Reduced precision on x86",
        "",
        _common.host_line(
            host,
            f"{suite['threads']} threads per runtime; date {suite['date']}; seeded random "
            "deit weights (fidelity only), the digits ViT trained here",
        ),
        f"- precisions compiled here: {', '.join(suite['precisions'])}",
    ]
    for precision, reason in suite["refused"].items():
        lines.append(f"- {precision}: refused on this host: {reason}")
    lines += [
        "- int8: the blocks' qkv/proj/fc1/fc2 in int8 (per-channel weights, per-tensor "
        f"activations calibrated by max on {CALIB_SIZE} {CALIB} images), int32 sums; LayerNorm, "
        "softmax, GELU, attention matmuls, patch embedding and head in fp32",
        "- bf16: the same layers with inputs and weights rounded to bf16 (`vdpbf16ps`), fp32 "
        "sums; the rest in fp32 as for int8",
        "- each vitsparse row's error is against the PyTorch model of the same computation "
        "(plan applied; int8 fake-quantized with the same scales; bf16 rounded), the peers' "
        "against fp32 PyTorch; latencies are medians of alternating rounds, ms",
        *_common.reproduce_block(suite["command"]),
        "## Goals (batch 1; ratio = the slower row's median / the faster row's)",
        "",
        *_goal_lines(suite["runs"], suite["refused"]),
        "",
    ]
    for run in suite["runs"]:
        lines += [f"## {run['model']}, batch {run['batch']}", ""]
        lines += ["| runtime | median ms | min ms | max err vs its reference | status |"]
        lines += ["|---|---|---|---|---|"]
        for row in run["rows"]:
            lat = row.get("latency_ms")
            err = row.get("max_abs_err_vs_torch")
            lines.append(
                f"| {row['runtime']} | {lat['median']:.2f} | {lat['min']:.2f} | "
                f"{'-' if err is None else f'{err:.1e}'} | {row['status']} |"
                if lat
                else f"| {row['runtime']} | - | - | - | {row['status']} |"
            )
        lines.append("")
        details = [f"- {row['runtime']}: {row['detail']}" for row in run["rows"] if row["detail"]]
        lines += ["<details><summary>row details</summary>", "", *details, "", "</details>", ""]
    if suite.get("digits"):
        lines += ["## Accuracy: digits ViT top-1 on the digits test split (compiled)", ""]
        lines += ["| precision | plan | top-1 |", "|---|---|---|"]
        lines += [f"| {r['precision']} | {r['plan']} | {r['top1']:.4f} |" for r in suite["digits"]]
        lines.append("")
    if suite.get("fidelity"):
        lines += [
            "## Fidelity: deit_tiny (seeded random weights), compiled, on "
            f"{suite['fidelity_images']} synthetic images",
            "",
            "Agreement: top-1 equal to fp32 dense PyTorch's. On random weights int8 and bf16 "
            "rounding ties flip and cascade through 48 reduced layers, so the error against its "
            "own reference is about that of a 1e-6 input change (tests/test_precision.py).",
            "",
            "| precision | plan | agreement | mean abs err vs its reference |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['precision']} | {r['plan']} | {r['agreement']:.3f} | "
            f"{r['mean_abs_err_vs_reference']:.2e} |"
            for r in suite["fidelity"]
        ]
        lines.append("")
    if suite.get("profile"):
        lines += [
            "## Where the time goes: deit_tiny batch 1, the ten most expensive kernels",
            "",
            "| precision | kernel | ms per inference | calls |",
            "|---|---|---|---|",
        ]
        for precision, kernels in suite["profile"].items():
            lines += [
                f"| {precision} | {k['kernel']} | {k['ms_per_inference']:.3f} | "
                f"{k['calls_per_inference']} |"
                for k in kernels
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--fidelity-images", type=int, default=32)
    p.add_argument("--skip-accuracy", action="store_true")
    _common.add_common_args(p, number=3)
    args, threads, command = _common.start(p, "precision.py", argv)
    precisions, refused = precisions_here()
    start = time.time()
    runs = []
    for model_id in args.models:
        for batch in args.batches:
            runs.append(measure_batch(model_id, batch, precisions, args, threads))
    suite = {
        "command": command,
        "date": _common.now(),
        "threads": threads,
        "host": host_info(),
        "precisions": precisions,
        "refused": refused,
        "runs": runs,
        "fidelity_images": args.fidelity_images,
    }
    if not args.skip_accuracy:
        suite["digits"] = _digits_accuracy(precisions)
        suite["fidelity"] = _deit_fidelity(precisions, args.fidelity_images)
        suite["profile"] = {p: _profile(p) for p in precisions}
    suite["seconds"] = time.time() - start
    _common.write_suite(args.outdir, "precision_x86", suite, render(suite))


if __name__ == "__main__":
    main()
