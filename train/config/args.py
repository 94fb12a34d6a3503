"""Shared command-line parsing: `--config-name NAME` (or `--config-name=NAME`) plus Hydra overrides,
and Hydra's query flags: `--cfg job|all` (print the composed config instead of running; `--resolve`
resolves its interpolations) and `--info` (recipes, config groups and their options)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

CFG_CHOICES = ("job", "all")


@dataclass
class CommandLine:
    name: str | None
    overrides: list[str] = field(default_factory=list)
    cfg: str | None = None  # --cfg job|all: print the config, do not run
    resolve: bool = False
    info: bool = False


def parse_command_line(argv: list[str], usage: str, default_name: str | None = None) -> CommandLine:
    """Exits with usage on -h/--help, and with an error on a missing name or an unknown option."""
    line = CommandLine(default_name)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        if arg in ("--config-name", "-cn", "--cfg", "-c"):
            if i + 1 == len(argv):
                sys.exit(f"error: {arg} needs a value\n{usage}")
            _set(line, arg, argv[i + 1], usage)
            i += 2
            continue
        if arg.startswith(("--config-name=", "--cfg=")):
            _set(line, *arg.split("=", 1), usage)
        elif arg in ("--resolve", "--info", "-i"):
            line.resolve = line.resolve or arg == "--resolve"
            line.info = line.info or arg != "--resolve"
        elif arg.startswith("-"):
            sys.exit(f"error: unknown option {arg}\n{usage}")
        else:
            line.overrides.append(arg)
        i += 1
    if not line.name and not line.info:
        sys.exit(f"error: --config-name is required\n{usage}")
    return line


def _set(line: CommandLine, option: str, value: str, usage: str) -> None:
    if option in ("--cfg", "-c"):
        if value not in CFG_CHOICES:
            sys.exit(f"error: --cfg {value}: choose one of {', '.join(CFG_CHOICES)} (hydra's own config is not "
                     f"used here)\n{usage}")
        line.cfg = value
    else:
        line.name = value

