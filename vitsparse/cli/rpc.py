"""``vitsparse rpc tracker|server``: a local RPC tracker, or a device server registered with one
(this machine, or the emulated aarch64 board)."""

from __future__ import annotations

import argparse
import time

from vitsparse.cli._common import positive_int
from vitsparse.errors import TargetError


def add_parser(commands) -> None:
    p = commands.add_parser("rpc", help="a local RPC tracker or device server, for testing")
    rpc_commands = p.add_subparsers(dest="rpc_command", required=True, metavar="WHAT")
    q = rpc_commands.add_parser("tracker", help="run an RPC tracker until interrupted")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    q.add_argument("--port", type=positive_int, default=9190, help="first port to try")
    q.set_defaults(run=run_tracker)
    q = rpc_commands.add_parser(
        "server", help="run an RPC server for this machine, registered under a key"
    )
    q.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the tracker")
    q.add_argument(
        "--key", metavar="KEY", help="device key, e.g. jetson-orin (required; --qemu: arm-qemu)"
    )
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    q.add_argument("--port", type=positive_int, default=9090, help="first port to try")
    q.add_argument(
        "--qemu",
        action="store_true",
        help="serve an emulated aarch64 device under qemu-user instead of this machine "
        "(scripts/setup_arm_qemu.sh builds it); its latencies are reported as emulated",
    )
    q.set_defaults(run=run_server)


def run_tracker(args: argparse.Namespace) -> None:
    from vitsparse.devices import start_tracker

    tracker = start_tracker(args.host, args.port)
    print(f"tracker   {args.host}:{tracker.port} (Ctrl-C stops it)", flush=True)
    _wait(tracker)


def run_server(args: argparse.Namespace) -> None:
    from vitsparse.devices import parse_address, start_server
    from vitsparse.devices.qemu import ARM_QEMU_KEY, start_arm_server

    parse_address(args.tracker)
    if args.qemu:
        key = args.key or ARM_QEMU_KEY
        print(f"[rpc] starting the emulated aarch64 device (qemu-user) as {key!r} ...", flush=True)
        server = start_arm_server(args.tracker, key, host=args.host, port=args.port)
        what = "emulated aarch64 (qemu-user)"
    else:
        if args.key is None:
            raise TargetError("rpc server needs --key KEY (the name clients ask the tracker for)")
        key = args.key
        server = start_server(args.tracker, key, host=args.host, port=args.port)
        what = "this machine"
    print(
        f"server    {args.host}:{server.port}, key {key}, {what}, tracker {args.tracker} "
        "(Ctrl-C stops it)",
        flush=True,
    )
    _wait(server)


def _wait(process) -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        process.terminate()
