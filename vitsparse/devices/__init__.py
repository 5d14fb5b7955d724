"""Where compiled code runs and is measured: this machine, or boards behind a TVM RPC tracker
(the emulated ARM board among them); how many threads it runs with; power meters; the one
measurement path (latency and energy windows, one lost-device error); MetaSchedule's builders
and runners; and the watchdog that stops a job whose device went away."""

from vitsparse.devices.measure import (
    LatencyStats,
    Measurement,
    Timing,
    check_measurable,
    first_output,
    measure,
    time_call,
)
from vitsparse.devices.rpc import RpcDevice, parse_address, start_server, start_tracker
from vitsparse.devices.threads import available_cores, configure_threads, set_num_threads
from vitsparse.devices.watch import DeviceWatch

__all__ = [
    "DeviceWatch",
    "LatencyStats",
    "Measurement",
    "RpcDevice",
    "Timing",
    "available_cores",
    "check_measurable",
    "configure_threads",
    "first_output",
    "measure",
    "parse_address",
    "set_num_threads",
    "start_server",
    "start_tracker",
    "time_call",
]
