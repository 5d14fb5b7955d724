"""Per-target tuning databases.

Layout: ``DB_ROOT/<target key>/`` holds MetaSchedule's JSON database (database_workload.json and
database_tuning_record.json, one JSON document per line) and ``target.json``, the canonical target
the records were measured on. Records of different targets never share a directory, and a
directory whose target.json names another target is refused.

Every line is checked before MetaSchedule reads the files, so a corrupt database gives an error
that names the file and the line instead of a crash deep inside TVM.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitsparse._io import write_text_atomic
from vitsparse._tvm import ms
from vitsparse.errors import DatabaseError
from vitsparse.targets import TargetSpec

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
TARGET_FILE = "target.json"


def target_dir(db_root: str | Path, spec: TargetSpec) -> Path:
    return Path(db_root) / spec.key


def _check_lines(path: Path) -> int:
    count = 0
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatabaseError(
                    f"tuning database {path} is corrupt at line {lineno} ({exc.msg}); "
                    "remove that line (or the file) and re-run `vitsparse tune`"
                ) from exc
            count += 1
    return count


def validate(directory: Path, spec: TargetSpec) -> None:
    """Raise DatabaseError if ``directory`` is not a readable database for ``spec``."""
    target_file = directory / TARGET_FILE
    if target_file.exists():
        try:
            recorded = json.loads(target_file.read_text())
        except json.JSONDecodeError as exc:
            raise DatabaseError(f"tuning database {target_file} is not valid JSON") from exc
        if recorded.get("key") != spec.key:
            raise DatabaseError(
                f"tuning database {directory} holds records for target {recorded.get('key')!r},"
                f" not {spec.key!r}"
            )
    for name in (WORKLOADS, RECORDS):
        if (directory / name).exists():
            _check_lines(directory / name)


def open_target_database(db_root: str | Path, spec: TargetSpec, *, create: bool):
    """The JSONDatabase of ``spec`` under ``db_root``.

    With create=False a missing directory gives None (compile without tuned records); with
    create=True it is made, and target.json written.
    """
    root = Path(db_root)
    if root.exists() and not root.is_dir():
        raise DatabaseError(f"tuning database root {root} is not a directory")
    directory = target_dir(root, spec)
    if not directory.exists():
        if not create:
            return None
        directory.mkdir(parents=True)
    validate(directory, spec)
    if not (directory / TARGET_FILE).exists():
        write_text_atomic(
            directory / TARGET_FILE,
            json.dumps({"key": spec.key, "target": spec.to_json()}, indent=2) + "\n",
        )
    try:
        return ms.database.JSONDatabase(
            path_workload=str(directory / WORKLOADS),
            path_tuning_record=str(directory / RECORDS),
            allow_missing=True,
            module_equality="structural",
        )
    except Exception as exc:  # noqa: BLE001  (TVM raises its own error types)
        raise DatabaseError(f"tuning database {directory} cannot be read: {exc}") from exc
