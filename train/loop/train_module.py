"""One optimizer step: forward/backward over the micro-batches, loss normalisation, clipping, AdamW.

The loss of a step is the mean over every supervised token of the global batch (all
micro-batches and data-parallel ranks): each micro-batch's summed loss is divided by the global
token count, so packing and accumulation never change a token's weight.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from data_pipelines.training.batch import PackedBatch
from train.config.schema import Config, OptimConfig
from train.parallel.distributed import (
    DistInfo,
    all_reduce_sum,
    all_reduce_tensor_sum,
    average_gradients,
    clip_grad_norm,
    finalize_tensor_parallel_grads,
)
from train.precision import Precision


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    real_tokens: int  # global, this step
    supervised_tokens: int  # global, this step
    slots: int  # global token slots (real + padding), this step
    samples: int  # global, this step
    precision_metrics: dict  # e.g. FP8 saturation and scale range; empty outside FP8
    skipped_nonfinite: bool = False  # the update was skipped: non-finite loss or gradient norm
    # EVS: video tokens kept / before pruning, global this step (None without EVS videos).
    evs_keep_ratio: float | None = None


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine (or constant) to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.floor_lr + 0.5 * (cfg.lr - cfg.floor_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@dataclass(frozen=True)
class BatchTotals:
    """A step's global batch counts, summed over the data-parallel replicas (ranks of one replica
    hold the same batches) in one all-reduce, before the forward: the loss weight scales it."""

    loss_weight: float
    supervised_tokens: int
    real_tokens: int
    slots: int  # token slots, real + padding
    samples: int
    evs_kept: int  # video tokens EVS kept
    evs_total: int  # video tokens before EVS pruning

    @classmethod
    def reduce(cls, micro_batches: list[PackedBatch], tokens_per_frame: int, info: DistInfo) -> "BatchTotals":
        local = [sum(b.loss_weight for b in micro_batches),
                 sum(b.num_supervised_tokens for b in micro_batches),
                 sum(b.num_real_tokens for b in micro_batches),
                 sum(b.input_ids.numel() for b in micro_batches),
                 sum(b.num_samples for b in micro_batches),
                 sum(int(b.video_evs[:, 2].sum()) for b in micro_batches),
                 sum(int(b.video_evs[:, 1].sum()) * tokens_per_frame for b in micro_batches)]
        weight, *counts = all_reduce_tensor_sum(torch.tensor(local, dtype=torch.float64), info, "data").tolist()
        return cls(weight, *(int(c) for c in counts))


class TrainModule:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, info: DistInfo,
                 precision: Precision, schedule=None):
        """`model`: the module a step calls (possibly DDP-wrapped). `schedule`: the engine's micro-batch
        schedule (`Engine.step_schedule`): pipeline stages run 1F1B and average the gradients over the
        data-parallel replicas after the last micro-batch (no DDP wrapper then); None: each
        micro-batch's forward and backward in turn."""
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.info = info
        self.precision = precision
        self.schedule = schedule
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

    def _gradient_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync; FSDP2
        set_requires_gradient_sync)."""
        if sync:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):
            return _fsdp_no_sync(self.model)
        return contextlib.nullcontext()

    def _loss(self, batch: PackedBatch) -> tuple[torch.Tensor, int]:
        with self.precision.autocast():
            return self.model(batch.to(self.info.device))

    @torch.no_grad()
    def loss_sum(self, batch: PackedBatch) -> float:
        """The weighted loss sum of one micro-batch, forward only (validation): this rank's share
        of it (context parallelism), the same on every pipeline stage."""
        if self.schedule is not None:
            return self.schedule.loss(batch)
        return float(self._loss(batch)[0])

    def train_step(self, micro_batches: list[PackedBatch], step: int) -> StepResult:
        lr = learning_rate(step, self.cfg.optim, self.cfg.trainer.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = BatchTotals.reduce(micro_batches, self.cfg.model.tokens_per_tile, self.info)
        global_weight = totals.loss_weight
        if global_weight == 0:
            raise RuntimeError("a whole global batch has no supervised token; check the data's assistant turns")
        # Gradients are averaged over the data (and context) replicas; scale so the result is the
        # global weighted mean.
        scale = self.info.gradient_replicas / global_weight
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.schedule is not None:
            loss_sum = self.schedule.train(micro_batches, scale)
            average_gradients(params, self.info)
        else:
            loss_sum = 0.0
            for i, batch in enumerate(micro_batches):
                sync = i == len(micro_batches) - 1
                with self._gradient_sync(sync):
                    loss, _ = self._loss(batch)
                    (loss * scale).backward()
                self.precision.after_backward()
                loss_sum += float(loss.detach())
        finalize_tensor_parallel_grads(params, self.info)
        clip = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else float("inf")
        grad_norm = clip_grad_norm(params, clip, self.info)
        # Context-parallel peers each hold the loss of their slice of the rows.
        loss = all_reduce_sum(loss_sum, self.info, "data_context") / global_weight
        # clip_grad_norm_ reduces over DDP-synchronised grads, so every rank agrees on this.
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_a_row >= self.cfg.trainer.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm (loss={loss}, "
                    f"grad_norm={grad_norm}); stopping. The last good checkpoint is untouched: lower optim.lr or "
                    "check the data, then rerun to resume from it")
        self.precision.after_optimizer_step()
        return StepResult(
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
            real_tokens=totals.real_tokens,
            supervised_tokens=totals.supervised_tokens,
            slots=totals.slots,
            samples=totals.samples,
            precision_metrics=self.precision.step_metrics(),
            skipped_nonfinite=not finite,
            evs_keep_ratio=totals.evs_kept / totals.evs_total if totals.evs_total else None,
        )
