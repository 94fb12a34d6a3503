"""Held-out validation: the loss of every validation and monitor source, identical whatever the
world size, and invisible to training.

- Rows (`data_pipelines.training.validation`): the first `trainer.eval_samples` samples of each
  source, packed in order, one row per forward, built once per stage.
- Ranks: row i goes to data-parallel replica i % data_size (the ranks of one replica, across
  tensor / context parallelism, run it together); every rank runs the same number of forwards
  (a replica short of a row reruns its last and drops the result), as FSDP's gathers need.
- Reduction: each row's (loss sum, supervised tokens) lands in a float64 table indexed by row,
  summed over the ranks (context-parallel peers each hold part of a row's loss), then summed in
  row order: every rank and every world size adds the same numbers in the same order.
- Invisible: no gradient, and FP8 scaling state is restored afterwards, so a run with
  evaluation trains bit-identically to one without.
"""

from __future__ import annotations

from typing import Callable

import torch

from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.config import SourceConfig
from data_pipelines.training.loader import sample_spec
from data_pipelines.training.samples import Tokenizer
from data_pipelines.training.validation import ValidationSet, build_validation_set
from train.config.schema import Config
from train.parallel.distributed import DistInfo, all_reduce_tensor_sum
from train.precision import Precision


class Validator:
    def __init__(self, cfg: Config, tokenizer: Tokenizer, info: DistInfo, precision: Precision):
        self.cfg, self.tokenizer, self.info, self.precision = cfg, tokenizer, info, precision
        self.sources: list[SourceConfig] = [*cfg.data.val_sources, *cfg.data.monitor_sources]
        self._sets: list[ValidationSet] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.sources)

    def due(self, step: int) -> bool:
        every, last = self.cfg.trainer.eval_every, self.cfg.trainer.max_steps
        return self.enabled and (step == last or (every > 0 and step % every == 0))

    def sets(self) -> list[ValidationSet]:
        if self._sets is None:
            spec = sample_spec(self.cfg.data, self.cfg.model.tokens_per_tile, self.cfg.seed)
            self._sets = [build_validation_set(source, spec, self.tokenizer, self.cfg.trainer.eval_samples)
                          for source in self.sources]
        return self._sets

    @torch.no_grad()
    def evaluate(self, loss_sum: Callable[[PackedBatch], float]) -> dict[str, float]:
        """{"val/<source>/loss": mean per-token loss, ..., "val/loss": over data.val_sources}, from
        `loss_sum(batch)`: a row's weighted loss sum on this rank (`TrainModule.loss_sum`)."""
        sets = self.sets()
        rows = [(k, batch) for k, validation in enumerate(sets) for batch in validation.batches]
        replicas, mine = self.info.data_size, self.info.data_rank
        table = torch.zeros(len(rows), 2, dtype=torch.float64)  # (loss sum, supervised tokens) per row
        fp8_state = {k: v.clone() for k, v in self.precision.state_dict().items()}
        for start in range(0, len(rows), replicas):
            index = min(start + mine, len(rows) - 1)
            _, batch = rows[index]
            loss = loss_sum(batch)
            if start + mine < len(rows):
                table[index, 0] = float(loss)
                table[index, 1] = batch.loss_weight
        self.precision.load_state_dict(fp8_state)
        losses = all_reduce_tensor_sum(table[:, 0].clone(), self.info, "data_context")
        weights = all_reduce_tensor_sum(table[:, 1].clone(), self.info, "data")
        result: dict[str, float] = {}
        totals = [0.0, 0.0]
        for k, validation in enumerate(sets):
            picked = [i for i, (owner, _) in enumerate(rows) if owner == k]
            loss_sum = sum(float(losses[i]) for i in picked)
            weight = sum(float(weights[i]) for i in picked)
            result[f"val/{validation.name}/loss"] = loss_sum / weight if weight else float("nan")
            if k < len(self.cfg.data.val_sources):
                totals[0] += loss_sum
                totals[1] += weight
        if self.cfg.data.val_sources:
            result["val/loss"] = totals[0] / totals[1] if totals[1] else float("nan")
        return result

    def skipped(self) -> dict[str, int]:
        """Samples of the held-out sources skipped as bad input, per source and reason (once built)."""
        if self._sets is None:
            return {}
        return {f"val/{v.name}/skipped/{reason}": n for v in self.sets() for reason, n in sorted(v.skipped.items())}
