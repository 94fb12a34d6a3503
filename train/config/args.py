"""Shared command-line parsing: `--config-name NAME` (or `--config-name=NAME`) plus Hydra overrides."""

from __future__ import annotations

import sys


def split_args(argv: list[str], usage: str, default_name: str | None = None) -> tuple[str, list[str]]:
    """Returns (config name, overrides). Exits with usage on -h/--help or a missing name."""
    name, overrides = default_name, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        if arg in ("--config-name", "-cn"):
            if i + 1 == len(argv):
                sys.exit(f"error: {arg} needs a value\n{usage}")
            name, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            sys.exit(f"error: unknown option {arg}\n{usage}")
        else:
            overrides.append(arg)
        i += 1
    if not name:
        sys.exit(f"error: --config-name is required\n{usage}")
    return name, overrides
