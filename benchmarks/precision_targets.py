"""Every precision on every kind of target: the digits ViT, dense and with half the blocks of its
MLP layers pruned, compiled for x86 (this host), ARM (``arm``: NEON; ``arm82``: the dot product;
``arm84``: FEAT_FHM) and CUDA (sm_80) in fp32, bf16, fp16 and int8, and the reason where a target
refuses a precision.

Each compiled model runs where it can: x86 on this CPU; ARM on the emulated aarch64 device over
RPC (qemu-user: correctness only, no latency is reported); CUDA on a GPU where this machine has
one, else its graph (the pipeline stopped before the CUDA schedules: typed matmuls and BSR kernels
in the precision, `jobs.compile.graph_on_host`) on this CPU, which checks what the CUDA kernels
compute, not the kernels themselves. Each output is compared with the PyTorch model of the same
computation (`plan.quantize.reference_model` of the plan-applied model: int8 with the compile's
scales) on the digits test split: the largest difference, the reference's own distance from
fp32, and the top-1 accuracy of the compiled model, the reference and fp32. Then deit_tiny's
CUDA compiles in fp16 and int8: the tensor-core fragments nvcc built.

    python benchmarks/precision_targets.py

Writes docs/results/precision_targets.{json,md}.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import _common
import numpy as np
import torch

from vitsparse._tvm import tvm
from vitsparse.data.sources import load_images
from vitsparse.devices import Timing, measure
from vitsparse.devices.qemu import ARM_QEMU_KEY, arm_python, start_arm_server
from vitsparse.devices.rpc import RpcDevice, start_tracker
from vitsparse.errors import TargetError
from vitsparse.frontend import import_model, load_torch_model
from vitsparse.jobs._inputs import resolve_inputs
from vitsparse.jobs.compile import compile_model, compile_resolved, graph_on_host, quantization_for
from vitsparse.plan import apply_plan_to_torch
from vitsparse.plan.quantize import reference_model
from vitsparse.pruning.block_mask import block_mask_plan
from vitsparse.targets import PRECISIONS, check_precision, cuda_source, host_info, resolve_target

TARGETS = ("x86", "arm", "arm82", "arm84", "cuda")
MODEL = "vitsparse/digits_vit"
CALIB = "digits-train"


def _mlp_plan(model, model_id):
    mlp = [name for name, _ in model.named_modules() if name.endswith(("mlp.fc1", "mlp.fc2"))]
    return block_mask_plan(model, model_id=model_id, block=(16, 16), keep=0.5, layers=mlp)


class _Arm:
    """The emulated ARM device, started on first use (None, with the reason, where it cannot)."""

    def __init__(self):
        self.device, self.reason, self._procs = None, "", []

    def get(self) -> RpcDevice | None:
        if self.device is None and not self.reason:
            try:
                arm_python()
                tracker = start_tracker("127.0.0.1", 9398)
                self._procs.append(tracker)
                address = f"127.0.0.1:{tracker.port}"
                self._procs.append(start_arm_server(address, port=9498))
                self.device = RpcDevice(address, ARM_QEMU_KEY)
            except TargetError as err:
                self.reason = str(err)
        return self.device

    def close(self) -> None:
        for proc in reversed(self._procs):
            proc.terminate()


def _kernels(decisions: list[dict]) -> str:
    counts = Counter(" ".join(filter(None, (d["kernel"], d.get("precision")))) for d in decisions)
    return ", ".join(f"{n}x {k}" for k, n in sorted(counts.items())) or "no masked layers"


def _run(target, compiled, imported, inputs, quantization, x, arm: _Arm):
    """(output, where it ran) of a compiled model, or (None, why not)."""
    if target == "x86":
        return compiled.run(x), "this CPU"
    if target.startswith("arm"):
        device = arm.get()
        if device is None:
            return None, f"not run: {arm.reason}"
        timing = Timing(repeat=1, number=1, warmup=0)
        result = measure(compiled.executable, compiled.spec, [x], rpc=device, timing=timing)
        return result.output, result.device
    if tvm.cuda(0).exist:
        return compiled.run(x), f"GPU ({tvm.cuda(0).device_name})"
    executable, _ = graph_on_host(imported, inputs, quantization)
    vm = tvm.runtime.vm.VirtualMachine(executable, tvm.cpu())
    output = vm["main"](tvm.runtime.tensor(x)).numpy()
    return output, "this CPU: the CUDA graph, unscheduled (no GPU here)"


def _row(target, precision, plan_name, plan, model, data, arm) -> dict:
    x = data.images.numpy()
    inputs = resolve_inputs(
        target=target,
        plan=plan,
        precision=precision,
        calib=CALIB if precision == "int8" else None,
    )
    imported = import_model(model, batch=len(x))
    quantization = quantization_for(imported, inputs)
    compiled = compile_resolved(imported, inputs, quantization=quantization)
    output, ran = _run(target, compiled, imported, inputs, quantization, x, arm)
    row = {
        "target": target,
        "key": compiled.spec.key,
        "precision": precision,
        "plan": plan_name,
        "status": "compiled",
        "kernels": _kernels(compiled.sparsity_decisions),
        "ran": ran,
    }
    if output is None:
        return row
    base = model if plan is None else apply_plan_to_torch(model, plan)
    with torch.no_grad():
        fp32 = base(data.images).numpy()
        reference = reference_model(base, precision, quantization)(data.images).numpy()
    labels = data.labels.numpy()
    row.update(
        status="ran",
        max_err_vs_reference=float(np.abs(output - reference).max()),
        median_image_err=float(np.median(np.abs(output - reference).max(axis=1))),
        reference_vs_fp32=float(np.abs(reference - fp32).max()),
        top1=float((output.argmax(1) == labels).mean()),
        top1_reference=float((reference.argmax(1) == labels).mean()),
        top1_fp32=float((fp32.argmax(1) == labels).mean()),
    )
    return row


def _fragments(precision: str) -> dict:
    compiled = compile_model(
        "deit_tiny_patch16_224",
        target="cuda",
        precision=precision,
        calib="synthetic" if precision == "int8" else None,
        calib_size=8,
    )
    source = cuda_source(compiled.executable)
    kinds = sorted(
        set(re.findall(r"wmma::fragment<nvcuda::wmma::(\w+, 16, 16, 16, [\w ]+)", source))
    )
    return {
        "precision": precision,
        "key": compiled.spec.key,
        "mma_sync_calls": source.count("wmma::mma_sync"),
        "fragments": kinds,
    }


def _markdown(suite: dict) -> str:
    lines = [
        "# Every precision on every target",
        "",
        _common.host_line(suite["host"], f"date {suite['date']}"),
        f"- model: {MODEL} (trained here on scikit-learn's digits), {suite['images']} images "
        "of its test split; the plan: half the 16x16 blocks of every MLP layer",
        "- ARM runs on the emulated aarch64 device (qemu-user): correctness, no latency. CUDA "
        "runs on a GPU only where this machine has one; elsewhere its graph (the pipeline "
        "before the CUDA schedules) runs on this CPU, which checks the computation, not the "
        "CUDA kernels.",
        "- err: the largest |compiled - reference| over the images' logits, the reference being "
        "the PyTorch model of the same computation (median: the median image's largest); "
        "ref-fp32: that reference's own distance from fp32. int8 is exact but for an image "
        "now and then where an activation within float32 noise of a rounding tie went the "
        "other way (docs/architecture.md, Reduced precision)",
        "- masked layers: the kernel each block-masked layer got (on x86 the measured "
        "break-even decides; elsewhere every masked layer is BSR)",
        *_common.reproduce_block(suite["command"]),
        "| target | precision | plan | masked layers | ran on | err (median) | ref-fp32 "
        "| top-1 (compiled / reference / fp32) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in suite["rows"]:
        if r["status"] == "refused":
            continue
        if r["status"] == "ran":
            err = f"{r['max_err_vs_reference']:.2g} ({r['median_image_err']:.2g})"
            dist = f"{r['reference_vs_fp32']:.2g}"
            top1 = f"{r['top1']:.3f} / {r['top1_reference']:.3f} / {r['top1_fp32']:.3f}"
        else:
            err = dist = top1 = "-"
        lines.append(
            f"| {r['key']} | {r['precision']} | {r['plan']} | {r['kernels']} | {r['ran']} "
            f"| {err} | {dist} | {top1} |"
        )
    lines += ["", "## Refused", "", "| target | precision | reason |", "|---|---|---|"]
    for r in suite["rows"]:
        if r["status"] == "refused":
            lines.append(f"| {r['target']} | {r['precision']} | {r['reason']} |")
    lines += [
        "",
        "## deit_tiny on CUDA: the tensor cores",
        "",
        "The fragments (A, B, accumulator: type) of the wmma matmuls in the CUDA source nvcc "
        "compiled; `wmma::mma_sync` calls in it.",
        "",
        "| target | mma_sync calls | fragments |",
        "|---|---|---|",
    ]
    for f in suite["cuda_deit_tiny"]:
        kinds = "; ".join(f"`{k}`" for k in f["fragments"])
        lines.append(f"| {f['key']} | {f['mma_sync_calls']} | {kinds} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="digits test images (default 64)")
    _common.add_output_args(parser)
    args, _threads, command = _common.start(parser, "precision_targets.py", argv)
    model, model_id = load_torch_model(MODEL)
    plans = {"dense": None, "mlp blocks 50%": _mlp_plan(model, model_id)}
    data = load_images("digits", image_size=model.patch_embed.img_size[0], limit=args.images)
    arm, rows = _Arm(), []
    try:
        for target in TARGETS:
            spec = resolve_target(target)
            for precision in PRECISIONS:
                try:
                    check_precision(spec, precision)
                except TargetError as err:
                    rows.append(
                        dict(target=target, precision=precision, status="refused", reason=str(err))
                    )
                    continue
                for plan_name, plan in plans.items():
                    _common.say(f"[precision_targets] {target} {precision} {plan_name}")
                    rows.append(_row(target, precision, plan_name, plan, model, data, arm))
    finally:
        arm.close()
    suite = {
        "command": command,
        "date": _common.now(),
        "host": host_info(),
        "images": len(data.images),
        "rows": rows,
        "cuda_deit_tiny": [_fragments(p) for p in ("fp16", "int8")],
    }
    markdown = _markdown(suite)
    print(markdown)
    _common.write_suite(args.outdir, "precision_targets", suite, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
