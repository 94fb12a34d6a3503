"""`train.plan --measure`: a few real training steps of the recipe's model on this device, so the
estimate is checked against what the machine does.

One process on the native engine (whatever layout the recipe names: a parallel layout is sized by
the estimate, not measured here), the recipe's precision and optimizer, text-only packed rows of
`data.seq_length` tokens (4 samples a row, every token supervised, random ids: the cost of a step
does not depend on which tokens they are). The first step is warm-up; the median of the others is
reported. Peak memory: CUDA's peak allocation on a GPU; the process's peak RSS on CPU (which also
counts the Python and torch runtime, a few hundred MiB).
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.special_tokens import ALL_SPECIAL_TOKENS
from train.config.schema import Config
from train.engines.assembly import assemble
from train.loop.train_module import TrainModule
from train.parallel.distributed import DistInfo

SAMPLES_PER_ROW = 4
# Every tokenizer this project trains gives the special tokens the ids of their order; the rows below
# draw ordinary ids above them, so no media token appears (text-only rows need no tokenizer).
SPECIAL_IDS = {token: index for index, token in enumerate(ALL_SPECIAL_TOKENS)}


def synthetic_row(cfg: Config, device: torch.device) -> PackedBatch:
    """(micro_batch_size, seq_length) random ids in 4 packed samples per row."""
    rows, length = cfg.trainer.micro_batch_size, cfg.data.seq_length
    ids = torch.randint(len(SPECIAL_IDS), cfg.model.language_model.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    bounds = torch.linspace(0, length, SAMPLES_PER_ROW + 1).round().long()
    seq_idx = torch.bucketize(torch.arange(length), bounds[1:-1], right=True).to(torch.int32).expand(rows, length)
    cu = torch.cat([bounds[:-1] + r * length for r in range(rows)] + [torch.tensor([rows * length])]).to(torch.int32)
    return PackedBatch.build(ids, ids.clone(), seq_idx.contiguous(), cu).to(device)


def measure(cfg: Config, steps: int = 4) -> dict:
    """Step time, tokens/s and peak memory of `steps` optimizer steps (the first is warm-up), each
    the trainer's own step (`TrainModule.train_step`: schedule, clipping, precision hooks)."""
    device = torch.device("cuda" if cfg.trainer.device == "cuda" or (
        cfg.trainer.device == "auto" and torch.cuda.is_available()) else "cpu")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    cfg.model.impl, cfg.init.from_checkpoint, cfg.init.allow_random = "native", None, list(cfg.trainable.frozen)
    stage = assemble(cfg, info, SPECIAL_IDS)  # no resume: a fresh model, as the estimate assumes
    step = TrainModule(stage.forward_module, stage.optimizer, cfg, info, stage.precision)
    batch = synthetic_row(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(max(steps, 2)):
        started = time.perf_counter()
        step.train_step([batch], index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[1:])
    tokens = batch.input_ids.numel()
    peak_gib = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"device": str(device), "engine": "native, 1 process", "tokens_per_step": tokens, "steps": len(times) - 1,
            "step_seconds": step_s, "tokens_per_second": tokens / step_s, "peak_memory_gib": peak_gib,
            "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS"}


def format_measured(measured: dict, estimated_total_gib: float) -> str:
    return (f"measured on {measured['device']} ({measured['engine']}, {measured['tokens_per_step']:,} tokens a step, "
            f"median of {measured['steps']}): {measured['step_seconds']:.3f} s/step, "
            f"{measured['tokens_per_second']:,.0f} tokens/s, peak memory {measured['peak_memory_gib']:.2f} GiB "
            f"({measured['peak_memory_kind']}) vs {estimated_total_gib:.2f} GiB estimated")
