"""The lost-device watchdog: a job that measures on a device behind an RPC tracker (tuning,
profiling, the search loop) is stopped within seconds once the device is gone, with one error
that names the device and says what was kept."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

import psutil

from vitsparse.devices.rpc import RpcDevice
from vitsparse.errors import TargetError


class _DeviceLost(BaseException):
    """Raised in the main thread to stop a job whose device is gone (a BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way swallows it)."""


class DeviceWatch:
    """While a job measures over RPC: asks the tracker every ``period`` seconds whether the
    device is still registered. Once it is gone (twice in a row), every measurement left would
    fail, so the job is stopped the way Ctrl-C stops it: SIGINT to the main thread, which raises
    `_DeviceLost` there, sent again every second until the job has stopped. On leaving, a lost
    device (also one that a last check finds gone) turns however the job ended into a
    TargetError that names the device and says what was kept (``kept()``, e.g. "The 12 tuning
    records measured are kept in DIR"), and how to resume."""

    def __init__(self, rpc: RpcDevice, kept: Callable[[], str], period: float = 2.0):
        self.rpc, self.kept, self.period = rpc, kept, period
        self.lost: str | None = None
        self._stop, self._lock, self._sent = threading.Event(), threading.Lock(), False
        # Signal handlers run in the main thread only: a job run elsewhere is not interrupted,
        # its measurements fail until it ends, and it then raises the same TargetError.
        self._main = threading.current_thread() is threading.main_thread()
        self._thread = threading.Thread(target=self._watch, name="vitsparse-device", daemon=True)

    def __enter__(self):
        self._started = time.time()
        if self._main:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._stop.set()
        self._thread.join(timeout=30)
        if self._main:
            if self._sent:
                time.sleep(0.05)  # a signal sent just before stopping arrives here, ignored
            signal.signal(signal.SIGINT, self._previous)
        if self.lost is None:
            try:
                self.rpc.check()
            except TargetError as err:
                self.lost = str(err)
        if self.lost is not None:
            self._kill_workers()
            raise TargetError(
                f"device {self.rpc.key!r} went away during the job: {self.lost}. "
                f"{self.kept()}: re-run the same command once the device is back to resume"
            ) from None

    def _watch(self) -> None:
        misses = 0
        while not self._stop.wait(self.period if self.lost is None else 1.0):
            if self.lost is None:
                try:
                    self.rpc.check()
                    misses = 0
                    continue
                except TargetError as err:
                    misses += 1
                    if misses < 2:
                        continue
                    self.lost = str(err)
            with self._lock:
                if self._main and not self._stop.is_set():
                    self._sent = True
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _on_sigint(self, signum, frame) -> None:
        if self.lost is None:  # the user's Ctrl-C: what it did before
            if callable(self._previous):
                self._previous(signum, frame)
            elif self._previous != signal.SIG_IGN:
                raise KeyboardInterrupt
        elif not self._stop.is_set() and not _in_ms_logging(frame):
            raise _DeviceLost(self.lost)

    def _kill_workers(self) -> None:
        """Kill the MetaSchedule worker processes started during the job (builder, runner):
        Python would otherwise wait at exit for the builds in flight to finish."""
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                ours = child.create_time() >= self._started
                if ours and "tvm.exec.popen_worker" in child.cmdline():
                    child.kill()


def _in_ms_logging(frame) -> bool:
    """Whether ``frame`` runs under MetaSchedule's logging callback, which its C++ calls from a
    destructor: an exception raised there aborts the process (std::terminate). The job is
    stopped by the next signal, a second later."""
    while frame is not None:
        if frame.f_globals.get("__name__") == "tvm.s_tir.meta_schedule.logging":
            return True
        frame = frame.f_back
    return False
