"""The emulated ARM device: an aarch64 TVM RPC server run under qemu-user on this machine.

`scripts/setup_arm_qemu.sh` builds its root (an aarch64 Python with the aarch64 wheels of this
machine's TVM, under ``.cache/arm-qemu`` or ``$VITSPARSE_ARM_ROOT``); `start_arm_server` runs a
TVM RPC server from it, registered with a tracker under ``"arm-qemu"``. Modules compiled for the
``arm`` preset then run on it through RPC like on a board.

The server says it is emulated: its sessions answer `EMULATION_FUNC` with a description, and
`vitsparse.devices.measure` reads it, so a latency measured there is reported as emulated,
never as an ARM hardware number.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vitsparse.devices.rpc import EMULATION_FUNC, RpcDevice, check_key, parse_address
from vitsparse.devices.threads import chosen_threads
from vitsparse.errors import TargetError

ARM_QEMU_KEY = "arm-qemu"
ROOT_ENV = "VITSPARSE_ARM_ROOT"
SETUP = "scripts/setup_arm_qemu.sh"

# Runs in the aarch64 Python. TVM's Server starts its worker with sys.executable, which must be
# the qemu wrapper (a bare aarch64 binary cannot be exec'd here: no binfmt_misc).
_BOOTSTRAP = f"""
import sys
python, tracker_host, tracker_port, key, host, port, label = sys.argv[1:]
sys.executable = python
from tvm import rpc

def describe():
    import tvm
    tvm.register_global_func({EMULATION_FUNC!r}, lambda: label, override=True)

server = rpc.Server(host=host, port=int(port), port_end=int(port) + 100,
                    tracker_addr=(tracker_host, int(tracker_port)), key=key, silent=True,
                    server_init_callback=describe)
print(server.port, flush=True)
server.proc.join()
"""


def arm_root() -> Path:
    """Where the emulated device's root is: ``$VITSPARSE_ARM_ROOT``, else ``.cache/arm-qemu`` in
    the checkout vitsparse runs from."""
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "arm-qemu"


def arm_python(root: str | Path | None = None) -> Path:
    """The root's aarch64 Python wrapper; TargetError saying why when it cannot run here."""
    root = Path(root) if root is not None else arm_root()
    python = root / "bin" / "python3"
    if not (root / "READY").is_file() or not os.access(python, os.X_OK):
        raise TargetError(f"no emulated ARM root at {root}; build it with {SETUP} (make install)")
    if shutil.which("qemu-aarch64-static") is None:
        raise TargetError(
            f"qemu-aarch64-static is not installed (it runs the emulated ARM device); run {SETUP}"
        )
    return python


@dataclass
class EmulatedServer:
    """A running emulated device server; ``terminate()`` stops it and its session workers."""

    process: subprocess.Popen
    port: int
    key: str

    def terminate(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_arm_server(
    tracker: str,
    key: str = ARM_QEMU_KEY,
    *,
    host: str = "127.0.0.1",
    port: int = 9090,
    root: str | Path | None = None,
    timeout: float = 180.0,
) -> EmulatedServer:
    """Start the emulated aarch64 RPC server and wait until ``tracker`` lists it under ``key``
    (importing TVM under emulation takes seconds). TargetError if the root is missing or the
    server does not come up within ``timeout`` seconds. Its sessions run models on as many
    threads as this process has cores (or as TVM_NUM_THREADS says)."""
    check_key(key)
    tracker_host, tracker_port = parse_address(tracker)
    python = arm_python(root)
    label = f"aarch64 under qemu-user emulation on a {os.uname().machine} host"
    argv = [str(python), "-c", _BOOTSTRAP, str(python), tracker_host, str(tracker_port)]
    log = tempfile.TemporaryFile()  # the server's stderr: shown if it fails to come up
    threads = str(chosen_threads())
    process = subprocess.Popen(
        argv + [key, host, str(port), label],
        env={**os.environ, "TVM_NUM_THREADS": threads},
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,  # terminate() kills the server's workers with it
    )
    server = EmulatedServer(process, 0, key)
    deadline = time.monotonic() + timeout
    try:
        server.port = int(_first_line(process, deadline))
        device = RpcDevice(tracker, key)
        while True:
            try:
                device.check()
                return server
            except TargetError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    except (TargetError, ValueError) as err:
        server.terminate()
        log.seek(0)
        stderr = log.read().decode(errors="replace").strip()[-2000:]
        raise TargetError(
            f"the emulated ARM server did not register under {key!r} at {tracker} "
            f"within {timeout:.0f} s: {err}" + (f"\n{stderr}" if stderr else "")
        ) from None


def _first_line(process: subprocess.Popen, deadline: float) -> str:
    """The first stdout line of ``process`` (the server's port), or ValueError at the deadline or
    when it exits first."""
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
        if not ready:
            raise ValueError("no port reported")
        chunk = os.read(process.stdout.fileno(), 64)
        if not chunk:
            raise ValueError(f"it exited with code {process.wait()}")
        line += chunk
    return line.decode().strip()
