"""`python -m train --config-name <recipe> [hydra overrides]`: train one stage."""

from __future__ import annotations

import sys

from train.config.args import split_args
from train.config.compose import list_recipes, load_config
from train.config.schema import ConfigError

USAGE = (
    "usage: python -m train --config-name <recipe> [overrides...]\n"
    f"recipes: {', '.join(list_recipes())}\n"
    "examples:\n"
    "  python -m train --config-name stage1_image_sft smoke=cpu run.dir=/tmp/x\n"
    "  python -m train --config-name stage2_video_sft data.sources=[{name:mine,path:/data/shards,weight:1.0}]"
)


def main(argv: list[str] | None = None) -> int:
    name, overrides = split_args(sys.argv[1:] if argv is None else argv, USAGE)
    try:
        cfg = load_config(name, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from train.loop.exits import run_to_exit_code
    from train.loop.trainer import run_stage

    return run_to_exit_code(lambda: run_stage(cfg))


if __name__ == "__main__":
    sys.exit(main())
