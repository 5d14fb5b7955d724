"""Devices reached through a TVM RPC tracker, the way TVM users run a device farm.

One tracker, many boards: each board runs an RPC server registered with the tracker under a key
(``"arm-qemu"``, ``"jetson-orin"``, ...). vitsparse builds locally and measures on a free board of
the key: `vitsparse.devices.measure` uploads a compiled model (`upload`) and times it with
``time_evaluator``, and MetaSchedule's search measures through its RPC runner (`rpc_runner`).

`start_tracker` and `start_server` start a local tracker and servers for testing
(``vitsparse rpc tracker``, ``vitsparse rpc server --key K``), bound to 127.0.0.1 by default.
"""

from __future__ import annotations

import re
import select
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vitsparse._tvm import ms
from vitsparse.errors import TargetError
from vitsparse.targets import export_library

DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9090
# A server-side function an emulated device registers (`vitsparse.devices.qemu`): it answers
# what the device emulates, so that its latencies are never reported as hardware numbers.
EMULATION_FUNC = "tvm.rpc.server.vitsparse_emulation"
_ADDRESS = re.compile(r"\s*([A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\])\s*:\s*(\d{1,5})\s*")


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> (host, port); TargetError for anything else."""
    match = _ADDRESS.fullmatch(text) if isinstance(text, str) else None
    port = int(match.group(2)) if match else 0
    if not match or not 0 < port < 65536:
        raise TargetError(f"RPC address {text!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return match.group(1).strip("[]"), port


@dataclass(frozen=True)
class RpcDevice:
    """A device kind behind a tracker: ``tracker`` ``"HOST:PORT"`` and the device ``key``."""

    tracker: str
    key: str
    session_timeout: float = 600.0
    connect_timeout: float = 5.0

    @property
    def address(self) -> tuple[str, int]:
        return parse_address(self.tracker)

    def check(self) -> dict:
        """The tracker's summary, after checking that it answers and has a server under ``key``;
        TargetError names what is missing."""
        from tvm import rpc

        host, port = self.address
        try:  # a fast probe: TVM's own client retries for a minute before giving up
            socket.create_connection((host, port), timeout=self.connect_timeout).close()
        except OSError as err:
            raise TargetError(
                f"cannot reach the RPC tracker at {host}:{port} ({err.strerror or err}); start "
                "one with `vitsparse rpc tracker` or check --rpc"
            ) from None
        try:
            summary = rpc.connect_tracker(host, port).summary()
        except (RuntimeError, OSError) as err:
            raise TargetError(f"the RPC tracker at {host}:{port} does not answer: {err}") from None
        queues = summary.get("queue_info", {})
        if self.key not in queues or not registered(summary, self.key):
            known = ", ".join(sorted(k for k in queues if registered(summary, k))) or "none"
            raise TargetError(
                f"no device is registered under key {self.key!r} at the tracker {host}:{port} "
                f"(keys there: {known}); start one with `vitsparse rpc server --key {self.key}`"
            )
        return summary

    def connect(self):
        """An RPC session on a free device of ``key`` (waits for one while all are busy)."""
        self.check()
        host, port = self.address
        try:
            return request_session(host, port, self.key, session_timeout=self.session_timeout)
        except (RuntimeError, OSError) as err:
            raise TargetError(f"device {self.key!r} via {host}:{port}: {err}") from None


def device_threads(device: RpcDevice) -> int:
    """The size of TVM's thread pool on a device of ``device.key`` (its cores, by default)."""
    session = device.connect()
    try:
        return int(session.get_function("runtime.NumThreads")())
    except Exception as err:  # noqa: BLE001 - a lost device surfaces as any FFI error
        raise TargetError(f"device {device.key!r} via {device.tracker} failed: {err}") from None


def emulation(session) -> str | None:
    """What an RPC ``session``'s device says it emulates (the qemu device of
    `vitsparse.devices.qemu` does), or None for a real device."""
    try:
        describe = session.get_function(EMULATION_FUNC)
    except Exception:  # noqa: BLE001 - TVM raises a generic error for an unknown function
        return None
    return str(describe())


def upload(session, executable, spec, name: str):
    """Export ``executable`` (compiled for ``spec``) as the library ``name``, upload it to an RPC
    ``session`` and load it there; the remote module."""
    with tempfile.TemporaryDirectory(prefix="vitsparse-rpc-") as tmp:
        export_library(executable, Path(tmp) / name, spec)
        session.upload(str(Path(tmp) / name))
    return session.load_module(name)


def rpc_runner(device: RpcDevice, evaluator_config, f_alloc_argument=None):
    """MetaSchedule's RPC runner for ``device`` (measurements on a board, builds stay local)."""
    device.check()
    host, port = device.address
    config = ms.runner.RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=device.key,
        session_timeout_sec=int(device.session_timeout),
    )
    return ms.runner.RPCRunner(
        rpc_config=config,
        evaluator_config=evaluator_config,
        f_create_session=create_session_if_present,
        f_alloc_argument=f_alloc_argument,
        max_workers=1,
    )


def registered(summary: dict, key: str) -> int:
    """How many servers a tracker ``summary`` lists under ``key``."""
    return sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{key}")


def create_session_if_present(rpc_config):
    """MetaSchedule's session factory: `request_session` with the runner's settings, so that a
    device that disappears mid-job turns the remaining measurements into errors, not a hang."""
    return request_session(
        rpc_config.tracker_host,
        rpc_config.tracker_port,
        rpc_config.tracker_key,
        session_timeout=rpc_config.session_timeout_sec,
        priority=rpc_config.session_priority,
    )


def request_session(host, port, key, *, session_timeout=0, priority=1, poll=2.0):
    """TVM's tracker request (an RPC session on the next free server of ``key``), except that
    it gives up as soon as the tracker lists no server of the key: TVM's own request waits for
    one to come back, and retries, as a new request that waits, a matched server that died
    before answering. RuntimeError names the key and the tracker."""
    from tvm import rpc
    from tvm.rpc import base

    def gone():
        return RuntimeError(f"no device registered under key {key!r} any more at {host}:{port}")

    tracker = rpc.connect_tracker(host, port)
    if not registered(tracker.summary(), key):
        raise gone()
    request = rpc.connect_tracker(host, port)  # the answer comes when a server is free
    base.sendjson(request._sock, [base.TrackerCode.REQUEST, key, "", priority])
    while not select.select([request._sock], [], [], poll)[0]:
        if not registered(tracker.summary(), key):
            raise gone()
    value = base.recvjson(request._sock)
    if value[0] != base.TrackerCode.SUCCESS:
        raise RuntimeError(f"the tracker at {host}:{port} refused a request for {key!r}: {value}")
    url, server_port, matchkey = value[1]
    return rpc.connect(url, server_port, matchkey, session_timeout)


def start_tracker(host: str = "127.0.0.1", port: int = DEFAULT_TRACKER_PORT):
    """A TVM RPC tracker on ``host`` (the first free port from ``port``); ``.port`` says which,
    ``.terminate()`` stops it."""
    from tvm.rpc.tracker import Tracker

    return Tracker(host=host, port=port, port_end=port + 100, silent=True)


def check_key(key: str) -> None:
    """TargetError unless ``key`` can name a device at a tracker."""
    if not key or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise TargetError(f"device key {key!r} must be letters, digits, '.', '_' or '-'")


def start_server(
    tracker: str,
    key: str,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SERVER_PORT,
):
    """An RPC server on ``host`` registered with ``tracker`` (``"HOST:PORT"``) under ``key``;
    ``.terminate()`` stops it. Its sessions (child processes) inherit this process's thread
    count: every core it may use, unless the user chose one (`vitsparse.devices.threads`)."""
    from tvm.rpc.server import Server

    check_key(key)
    return Server(
        host=host,
        port=port,
        port_end=port + 100,
        tracker_addr=parse_address(tracker),
        key=key,
        silent=True,
    )
