"""``vitsparse targets``: the preset table, as resolved on this machine."""

from __future__ import annotations

import argparse
import json

from vitsparse.errors import VitsparseError


def add_parser(commands) -> None:
    p = commands.add_parser("targets", help="list the target presets as resolved on this machine")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from vitsparse.targets import PRESETS, list_presets, resolve_target

    for name in list_presets():
        print(f"{name}: {PRESETS[name].description}")
        try:
            spec = resolve_target(name)
        except VitsparseError as err:
            print(f"  not available here: {err}\n")
            continue
        compilers = [c for c in (spec.cross_compiler, spec.device_compiler) if c]
        print(f"  key        {spec.key}")
        print(f"  target     {json.dumps(spec.to_json()['target'])}")
        print(f"  runs here  {'yes' if spec.runs_locally else 'no'}")
        print(f"  toolchain  {', '.join(compilers) or 'host C++ compiler'}\n")
