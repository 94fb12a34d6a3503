"""`python -m launch.torchrun --nproc-per-node N --config-name <recipe> [overrides] [--dry-run]`

Renders the single-node torchrun command for a stage (or `--pipeline` for all stages) and runs it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def render_command(nproc_per_node: int, config_name: str | None, overrides: list[str], pipeline: bool = False,
                   python: str = sys.executable) -> list[str]:
    if nproc_per_node < 1:
        raise ValueError("--nproc-per-node must be >= 1")
    if not pipeline and not config_name:
        raise ValueError("--config-name is required unless --pipeline is given")
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}"]
    return cmd + train_module_args(config_name, overrides, pipeline)


def train_module_args(config_name: str | None, overrides: list[str], pipeline: bool) -> list[str]:
    """What torchrun runs in every worker: one stage (`-m train`) or all stages (`-m train.pipeline`)."""
    if pipeline:
        return ["-m", "train.pipeline", *overrides]
    return ["-m", "train", "--config-name", str(config_name), *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--config-name")
    parser.add_argument("--pipeline", action="store_true", help="run all stages (train.pipeline)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args, overrides = parser.parse_known_args(argv)
    try:
        cmd = render_command(args.nproc_per_node, args.config_name, overrides, args.pipeline)
    except ValueError as err:
        parser.error(str(err))
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    os.execvp(cmd[0], cmd)
    return 0  # unreachable: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
