"""Per-target tuning databases.

Layout: ``DB_ROOT/<target key>/`` holds MetaSchedule's JSON database (database_workload.json and
database_tuning_record.json, one JSON document per line) and ``target.json``, the canonical target
the records were measured on. Records of different targets never share a directory, and a
directory whose target.json names another target is refused.

Every line is checked before MetaSchedule reads the files, so a corrupt database gives an error
that names the file and the line instead of a crash deep inside TVM. A cut-off LAST line (what a
process killed in the middle of an append leaves) is dropped with a warning: the records before
it stand.
"""

from __future__ import annotations

import json
import warnings
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
    """The number of records in ``path``; a torn last line is dropped (the file rewritten
    atomically without it) with a warning, a bad line anywhere else is a DatabaseError."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    filled = [i for i, line in enumerate(lines) if line.strip()]
    count = 0
    for i in filled:
        try:
            json.loads(lines[i])
        except json.JSONDecodeError as exc:
            if i == filled[-1] and not lines[i].endswith("\n"):
                warnings.warn(
                    f"tuning database {path}: line {i + 1}, the last, is cut off (a tuning run "
                    f"was interrupted while writing it); dropped it, {count} record(s) kept",
                    stacklevel=3,
                )
                write_text_atomic(path, "".join(lines[:i]))
                break
            raise DatabaseError(
                f"tuning database {path} is corrupt at line {i + 1} ({exc.msg}); "
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
