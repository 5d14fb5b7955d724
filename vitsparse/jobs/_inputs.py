"""What every job resolves once, before its (slow) model import: the target and the precision
it compiles in, the tuning database, the plan and the device, each failing early with an error
that names it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitsparse.devices import RpcDevice
from vitsparse.errors import DataError
from vitsparse.plan import PruningPlan, load_plan
from vitsparse.schedules.database import open_target_database
from vitsparse.targets import (
    DEFAULT_PRECISION,
    TargetSpec,
    check_precision,
    resolve_target,
    with_precision,
)


@dataclass(frozen=True)
class Inputs:
    """A job's resolved inputs: ``database`` is the target's MetaSchedule database under the
    root ``db`` (None without one), ``rpc`` the device to measure on (None: this machine)."""

    spec: TargetSpec
    db: Path | None = None
    database: object | None = None
    plan: PruningPlan | None = None
    rpc: RpcDevice | None = None
    precision: str = DEFAULT_PRECISION
    calib: str | Path | None = None  # int8's calibration images (a `data.sources` name)
    calib_size: int = 64


def resolve_inputs(
    *,
    target: str | dict | TargetSpec = "x86",
    cuda_arch: str | None = None,
    db: str | Path | None = None,
    plan: PruningPlan | str | Path | None = None,
    rpc: RpcDevice | None = None,
    precision: str = DEFAULT_PRECISION,
    calib: str | Path | None = None,
    calib_size: int = 64,
) -> Inputs:
    """Resolve, in this order, the target, the precision (the target compiles it; int8 has
    calibration images), the database (read and checked, not created; its directory is the
    precision's), the plan (read and checked) and the device (its tracker answers and lists
    its key)."""
    spec = resolve_target(target, cuda_arch=cuda_arch)
    check_precision(spec, precision)
    if precision == "int8" and calib is None:
        raise DataError(
            "int8 needs calibration images for its activation scales: pass --calib "
            "(an ImageFolder directory, 'digits' or 'synthetic')"
        )
    if calib_size < 1:
        raise DataError(f"--calib-size must be a positive number of images, got {calib_size}")
    spec = with_precision(spec, precision)
    database = None if db is None else open_target_database(db, spec, create=False)
    plan = load_plan(plan)
    if rpc is not None:
        rpc.check()
    db_path = None if db is None else Path(db)
    return Inputs(spec, db_path, database, plan, rpc, precision, calib, calib_size)


def source_label(source) -> str:
    """How progress lines name a model source."""
    return str(source) if isinstance(source, str | Path) else type(source).__name__
