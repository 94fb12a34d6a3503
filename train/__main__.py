"""`python -m train --config-name <recipe> [hydra overrides]`: train one stage."""

from __future__ import annotations

import sys

from train.config.args import split_args
from train.config.compose import list_recipes, load_config
from data_pipelines.training.shards import DataError
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
    from train.checkpoint.store import CheckpointWriteError
    from train.loop.preemption import EXIT_PREEMPTED, Preempted
    from train.loop.trainer import run_stage

    try:
        run_stage(cfg)
    except Preempted as stop:
        if isinstance(stop.args[0] if stop.args else None, str):  # stopped during start-up
            print(f"preempted: {stop.args[0]} (exit {EXIT_PREEMPTED}: rerun to resume)", file=sys.stderr)
        return EXIT_PREEMPTED
    except CheckpointWriteError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (exit 130); rerun the same command to resume from the latest checkpoint", file=sys.stderr)
        return 130
    except ConfigError as err:  # found while building the stage (e.g. weights a frozen part lacks)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # nothing usable in a source, an unreadable shard with on_corrupt_shard=error...
        print(f"data error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
