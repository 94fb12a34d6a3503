"""`python -m train --config-name <recipe> [hydra overrides]`: train one stage."""

from __future__ import annotations

import sys
import textwrap

from train.config.args import parse_command_line
from train.config.compose import (
    CONFIGS_DIR,
    RECIPES_DIR,
    compose_yaml,
    field_reference,
    list_groups,
    list_recipes,
    load_config,
)
from train.config.schema import ConfigError


def _groups_text() -> str:
    return "\n".join(f"  {group}={'|'.join(options)}" for group, options in list_groups().items())


def usage() -> str:
    fields = "\n".join(textwrap.fill(f"{section}: {', '.join(names)}", 100, initial_indent="  ",
                                     subsequent_indent="      ") for section, names in field_reference().items())
    return (
        "usage: python -m train --config-name <recipe> [overrides...] [--cfg job|all [--resolve]] [--info]\n"
        f"recipes: {', '.join(list_recipes())}\n"
        "examples:\n"
        "  python -m train --config-name stage1_image_sft smoke=cpu run.dir=/tmp/x\n"
        "  python -m train --config-name stage2_video_sft data.sources=[{name:mine,path:/data/shards,weight:1.0}]\n"
        "  python -m train --config-name stage1_image_sft smoke=cpu --cfg job    # print the config, do not run\n"
        "config groups (group=option):\n"
        f"{_groups_text()}\n"
        "fields (section.field=value; the README explains them):\n"
        f"{fields}"
    )


def info() -> str:
    return (f"recipes ({RECIPES_DIR}): {', '.join(list_recipes())}\n"
            f"config groups ({CONFIGS_DIR}):\n{_groups_text()}")


def main(argv: list[str] | None = None) -> int:
    line = parse_command_line(sys.argv[1:] if argv is None else argv, usage())
    try:
        if line.info:
            print(info())
            return 0
        if line.cfg:  # job and all are the same here: the hydra section is not used by this program
            print(compose_yaml(line.name, line.overrides, resolve=line.resolve), end="")
            return 0
        cfg = load_config(line.name, line.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from train.loop.exits import run_to_exit_code
    from train.loop.trainer import run_stage

    return run_to_exit_code(lambda: run_stage(cfg))


if __name__ == "__main__":
    sys.exit(main())
