"""torchrun worker: the process groups of a tensor x context layout reduce over the right ranks."""

from __future__ import annotations

import json
import sys

from train.config.schema import ParallelConfig
from train.parallel.distributed import all_reduce_sum, init_distributed, shutdown, sum_count_tables


def main(out: str, tensor: int, context: int, engine: str) -> None:
    parallel = ParallelConfig(tensor_parallel=tensor, context_parallel=context, backend="gloo")
    make_groups = None
    if engine == "mcore":  # megatron builds the groups, the seam adopts them
        import functools

        from train.engines.mcore.model import megatron_process_groups

        make_groups = functools.partial(megatron_process_groups, parallel)
    info = init_distributed(parallel, "cpu", make_groups=make_groups)
    value = 10.0 ** info.rank  # every rank a distinct digit, so a sum names its members
    coords = info.dims.coordinates(info.rank)
    result = {
        "rank": info.rank, "data_rank": info.data_rank, "data_size": info.data_size,
        "coords": [coords.tensor, coords.context, coords.data, coords.pipeline],
        "sums": {g: all_reduce_sum(value, info, g) for g in ("tensor", "context", "data", "data_context", "world")},
        # Counts as the data loader keeps them: ranks of one replica hold the same ones.
        "counts": sum_count_tables({"counts": {"samples": 1 + info.data_rank}}, info)["counts"],
    }
    with open(f"{out}.{info.rank}.json", "w") as f:
        json.dump(result, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
