"""What the commands share: argument groups and types, the model source check, progress lines
and error messages, the RPC device options, and writing a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitsparse._io import write_text_atomic
from vitsparse._precision import DEFAULT_PRECISION, PRECISIONS
from vitsparse.errors import ArtifactError, ModelError, TargetError

EXIT_USAGE = 2


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="timm model name or path to an .onnx file")
    p.add_argument("--batch", type=positive_int, default=1, metavar="B", help="batch size")
    weights_args(p)


def weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="FILE", help="torch.save'd weights for MODEL")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    p.add_argument(
        "--weights-seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of timm's random weights, used without --checkpoint/--pretrained (default 0: "
        "every command gets the same weights, so a plan made by one applies in another)",
    )


def target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="x86",
        metavar="T",
        help="preset (`vitsparse targets` lists them) or a TVM target dict as JSON (default x86)",
    )
    p.add_argument("--cuda-arch", metavar="sm_XX", help="CUDA arch for --target cuda")


def precision_args(p: argparse.ArgumentParser, calib: str | None = None) -> None:
    """--precision, with --calib and --calib-size unless ``calib`` names where int8's
    calibration images come from instead."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="numeric precision of the blocks' linear layers (default fp32): bf16 (x86 with "
        "avx512_bf16), fp16 (ARM with fp16 multiply-add into fp32: --target arm84) or int8 "
        f"(x86 with AVX2, ARM with the dot product; calibrated on {calib or '--calib'}); "
        "refused, with the reason, where the target lacks it",
    )
    if calib is not None:
        return
    p.add_argument(
        "--calib",
        metavar="SRC",
        help="int8 calibration images: ImageFolder directory, 'digits-train', 'digits' or "
        "'synthetic' (required for int8)",
    )
    p.add_argument(
        "--calib-size", type=positive_int, default=64, metavar="N", help="images (default 64)"
    )


def timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="default: all CPUs this process may use"
    )
    p.add_argument("--repeat", type=positive_int, default=10, metavar="R", help="samples")
    p.add_argument("--number", type=positive_int, default=5, metavar="N", help="runs/sample")


def db_arg(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    help_text = "tuning database root" + ("" if required else " (from `vitsparse tune`)")
    p.add_argument("--db", metavar="DIR", required=required, help=help_text)


def rpc_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help=f"RPC tracker: {what}")
    p.add_argument("--key", metavar="KEY", help="device key at the tracker (with --rpc)")


def rpc_device(args: argparse.Namespace):
    """The `RpcDevice` of ``--rpc``/``--key`` (None without them)."""
    if args.rpc is None and args.key is None:
        return None
    if args.rpc is None or args.key is None:
        raise TargetError("--rpc HOST:PORT and --key KEY go together")
    from vitsparse.devices import RpcDevice, parse_address

    parse_address(args.rpc)
    return RpcDevice(args.rpc, args.key)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def output_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file name")
    return path


def model_source(text: str) -> str:
    """MODEL as the API takes it; a path to a file other than .onnx gets a pointed message."""
    path = Path(text)
    if not text.lower().endswith(".onnx") and (path.suffix or "/" in text) and path.exists():
        raise ModelError(
            f"{text!r} is a file, but only .onnx files can be given as MODEL; for PyTorch "
            "weights give the timm model name and --checkpoint FILE"
        )
    return text


def check_artifact_dir(outdir: Path, manifest: str) -> None:
    """Refuse to replace anything but an earlier artifact (export swaps the whole directory)."""
    if outdir.exists() and not outdir.is_dir():
        raise ArtifactError(f"output {str(outdir)!r} exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / manifest).is_file():
        raise ArtifactError(
            f"output directory {str(outdir)!r} is not empty and holds no vitsparse artifact "
            f"({manifest}); refusing to replace it, choose another -o"
        )


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def say(line: str) -> None:
    """A progress line (on stderr, so stdout keeps the result)."""
    print(line, file=sys.stderr, flush=True)


def message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return str(err)
