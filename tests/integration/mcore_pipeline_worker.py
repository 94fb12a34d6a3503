"""torchrun worker: one training step of the image stage (smoke model, model.impl=mcore) at
`parallel.pipeline_parallel=N`, through the trainer's own TrainModule (1F1B across the stages):
writes the step's loss and gradient norm, the logits of every micro-batch (from the last stage) and
the gradient of every parameter under its native name (from the stage that holds it).

The optimizer's learning rate is 0, so the step leaves the weights as they were and the gradients
(clipped as the trainer clips them) stay in place to be compared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipelines.training.samples import Tokenizer
from train.config.compose import load_config
from train.engines import resolve_engine
from train.engines.mcore import weights
from train.engines.assembly import assemble
from train.loop.train_module import TrainModule
from train.loop.trainer import build_data, prepare_data_files

MICRO_BATCHES = 3  # more than the stages: the 1F1B steady state runs


class LogitsTap(torch.nn.Module):
    """The model's loss, recording the logits it is computed from (B, L, V / tp) on the way."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.inner, self.logits = loss, []

    def forward(self, hidden, targets, target_weights, head_weight):
        self.logits.append((hidden @ head_weight.t()).detach().clone())
        return self.inner(hidden, targets, target_weights, head_weight)


def main(out: Path, stages: int) -> None:
    cfg = load_config("stage1_image_sft", [
        "smoke=cpu", "model.impl=mcore", f"parallel.pipeline_parallel={stages}",
        f"trainer.grad_accum_steps={MICRO_BATCHES}", f"run.dir={out}"])
    cfg.optim.lr = cfg.optim.min_lr = 0.0  # the step keeps the weights (a config must train: set here)
    engine = resolve_engine(cfg.model.impl)
    info = engine.init_distributed(cfg)
    if info.is_main:
        prepare_data_files(cfg)
    dist.barrier()
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    stage = assemble(cfg, info, tokenizer.special_ids)
    model = stage.model
    tap = model.loss = LogitsTap(model.loss)
    data = build_data(cfg, tokenizer, info)
    batches = [data.next_batch() for _ in range(MICRO_BATCHES)]
    module = TrainModule(stage.forward_module, stage.optimizer, cfg, info, stage.precision,
                         engine.step_schedule(stage.forward_module, info, stage.precision))
    result = module.train_step(batches, step=0)
    data.close()

    lm = model.language_model
    grads = {f"language_model.{k}": v for k, v in weights.megatron_to_native(
        lm.gather_local({n: p.grad for n, p in lm.model.named_parameters()}), lm.cfg).items()}
    grads |= {n: p.grad for n, p in model.named_parameters() if not n.startswith("language_model.") and p.grad is not None}
    torch.save({"loss": result.loss, "grad_norm": result.grad_norm, "logits": tap.logits, "grads": grads,
                "stage": lm.pp_rank}, out / f"rank{info.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
