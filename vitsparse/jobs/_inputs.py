"""What every job resolves once, before its (slow) model import: the target, the tuning
database, the plan and the device, each failing early with an error that names it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitsparse.devices import RpcDevice
from vitsparse.plan import PruningPlan, load_plan
from vitsparse.schedules.database import open_target_database
from vitsparse.targets import TargetSpec, resolve_target


@dataclass(frozen=True)
class Inputs:
    """A job's resolved inputs: ``database`` is the target's MetaSchedule database under the
    root ``db`` (None without one), ``rpc`` the device to measure on (None: this machine)."""

    spec: TargetSpec
    db: Path | None = None
    database: object | None = None
    plan: PruningPlan | None = None
    rpc: RpcDevice | None = None


def resolve_inputs(
    *,
    target: str | dict | TargetSpec = "x86",
    cuda_arch: str | None = None,
    db: str | Path | None = None,
    plan: PruningPlan | str | Path | None = None,
    rpc: RpcDevice | None = None,
) -> Inputs:
    """Resolve, in this order, the target, the database (read and checked, not created), the
    plan (read and checked) and the device (its tracker answers and lists its key)."""
    spec = resolve_target(target, cuda_arch=cuda_arch)
    database = None if db is None else open_target_database(db, spec, create=False)
    plan = load_plan(plan)
    if rpc is not None:
        rpc.check()
    return Inputs(spec, None if db is None else Path(db), database, plan, rpc)


def source_label(source) -> str:
    """How progress lines name a model source."""
    return str(source) if isinstance(source, str | Path) else type(source).__name__
