"""`python -m launch.torchrun --nproc-per-node N --config-name <recipe> [overrides] [--dry-run]`

Renders the torchrun command for a stage (or `--pipeline` for all stages), checks the config, and
runs it. One node by default (`--standalone`); several nodes without Slurm as torchrun users know it:
run the same command on every node with its own `--node-rank`, all naming node 0's address:

  python -m launch.torchrun --nnodes 2 --node-rank 0 --master-addr node0 --nproc-per-node 8 --config-name ...
  python -m launch.torchrun --nnodes 2 --node-rank 1 --master-addr node0 --nproc-per-node 8 --config-name ...

The config is composed and validated before anything starts (a bad override fails here, exit 2);
`--dry-run` prints the command and validates all but whether data and checkpoint paths exist.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Nodes:
    """Where this node sits in a (possibly multi-node) job."""

    count: int = 1
    rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT

    def torchrun_args(self) -> list[str]:
        if self.count < 1:
            raise ValueError("--nnodes must be >= 1")
        if self.count == 1:
            return ["--standalone"]
        if not 0 <= self.rank < self.count:
            raise ValueError(f"--node-rank={self.rank} must be in [0, --nnodes={self.count})")
        if not self.master_addr:
            raise ValueError("--nnodes > 1 needs --master-addr (node 0's address, the same on every node)")
        return [f"--nnodes={self.count}", f"--node-rank={self.rank}", f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port}"]


def render_command(nproc_per_node: int, config_name: str | None, overrides: list[str], pipeline: bool = False,
                   python: str = sys.executable, nodes: Nodes = Nodes()) -> list[str]:
    if nproc_per_node < 1:
        raise ValueError("--nproc-per-node must be >= 1")
    if not pipeline and not config_name:
        raise ValueError("--config-name is required unless --pipeline is given")
    cmd = [python, "-m", "torch.distributed.run", *nodes.torchrun_args(), f"--nproc-per-node={nproc_per_node}"]
    return cmd + train_module_args(config_name, overrides, pipeline)


def train_module_args(config_name: str | None, overrides: list[str], pipeline: bool) -> list[str]:
    """What torchrun runs in every worker: one stage (`-m train`) or all stages (`-m train.pipeline`)."""
    if pipeline:
        return ["-m", "train.pipeline", *overrides]
    return ["-m", "train", "--config-name", str(config_name), *overrides]


def check_config(config_name: str | None, overrides: list[str], pipeline: bool, check_paths: bool) -> None:
    """Compose and validate what the workers will run (every stage, for a pipeline)."""
    from train.config.compose import load_config
    from train.loop.pipeline import parse_pipeline_args

    if pipeline:
        stages, root, rest = parse_pipeline_args(overrides)
        for name in stages:
            load_config(name, rest + [f"run.dir={root / name}"], check_paths)
    else:
        load_config(str(config_name), overrides, check_paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.torchrun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (1: --standalone)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    parser.add_argument("--master-addr", help="node 0's address (needed with --nnodes > 1)")
    parser.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT)
    parser.add_argument("--config-name")
    parser.add_argument("--pipeline", action="store_true", help="run all stages (train.pipeline)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command instead of running it (data paths are not checked)")
    args, overrides = parser.parse_known_args(argv)
    nodes = Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port)
    try:
        cmd = render_command(args.nproc_per_node, args.config_name, overrides, args.pipeline, nodes=nodes)
    except ValueError as err:
        parser.error(str(err))
    from train.config.schema import ConfigError

    try:
        check_config(args.config_name, overrides, args.pipeline, check_paths=not args.dry_run)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    os.execvp(cmd[0], cmd)
    return 0  # unreachable: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
