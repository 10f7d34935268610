"""Sub-command groups of the `nuance` CLI beyond train / recipe / sample / export.

Every module here defines `add_parser(subparsers)`, which adds its command(s) with
`set_defaults(func=...)`; `orchestration.cli` discovers the modules, so a new command group is one new
file. Keep heavy imports inside the command functions: `nuance --help` must stay fast.
"""

from __future__ import annotations

import importlib
import pkgutil


def command_modules() -> list:
    return [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    ]
