"""One optimizer step of a tiny model on fixed micro-batches, under 1 or 2 ranks (DDP or FSDP2).

Run by tests/integration/test_data_parallel.py: `python dp_step_worker.py OUT ddp|fsdp|ddp+lora|fsdp+lora`
(alone or under torchrun; `+lora`: LoRA adapters on a bf16 base, built by the assembly). Rank r of W
takes micro-batches r*(4/W) .. ; rank 0 writes loss, grad norm and the full updated parameters to OUT.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from data_pipelines.training.packing import collate_rows
from data_pipelines.training.samples import Sample
from data_pipelines.training.special_tokens import IMG_CONTEXT
from train.config.schema import (
    Config,
    LanguageModelConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PeftConfig,
    TrainerConfig,
)
from train.engines.assembly import apply_trainable, assemble, build_optimizer
from train.loop.train_module import TrainModule
from train.model.vlm import VisionLanguageModel
from train.engines.native.data_parallel import wrap_data_parallel
from train.parallel.distributed import init_distributed, shutdown
from train.precision import build_precision

LM = LanguageModelConfig(pattern="M*-", hidden_size=32, vocab_size=64, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8, n_groups=1,
                         chunk_size=8, mlp_hidden_size=32)
MICRO_BATCHES = 4


def micro_batch(i: int):
    rng = np.random.default_rng(i)
    n = int(rng.integers(10, 32))
    ids = rng.integers(12, 64, size=n)
    labels = ids.copy()
    labels[: int(rng.integers(1, n // 2))] = -100
    return collate_rows([[Sample(ids, labels, torch.zeros(0, 3, 64, 64, dtype=torch.uint8), "t", str(i))]], 32, 3)


def main(out: str, mode: str) -> None:
    data_parallel, _, adapters = mode.partition("+")
    parallel = ParallelConfig(data_parallel=data_parallel, backend="gloo")
    info = init_distributed(parallel, "cpu")
    per_rank = MICRO_BATCHES // info.world_size
    cfg = Config(stage="t", model=ModelConfig(language_model=LM), parallel=parallel,
                 optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", clip_grad=1.0),
                 trainer=TrainerConfig(max_steps=1, grad_accum_steps=per_rank))
    torch.use_deterministic_algorithms(True)
    if adapters:
        cfg.peft = PeftConfig(method=adapters, rank=4, alpha=8.0,
                              targets=["attention_qkv", "attention_output", "mlp_up", "mlp_down", "mamba_in_proj"])
        cfg.trainer.device, cfg.init.allow_random = "cpu", ["vision_model"]
        cfg.precision.name = "bf16"  # peft.base_dtype=compute: frozen linears in bf16, adapters in fp32
        stage = assemble(cfg, info, {IMG_CONTEXT: 10})
        model, forward, optimizer = stage.model, stage.forward_module, stage.optimizer
    else:
        model = VisionLanguageModel(cfg.model, image_token_id=10)
        model.reset_parameters(0)
        apply_trainable(model, cfg.trainable)
        forward = wrap_data_parallel(model, parallel, info)
        optimizer = build_optimizer(model, cfg.optim)
    module = TrainModule(forward, optimizer, cfg, info, build_precision(cfg.precision, info.device))
    batches = [micro_batch(i) for i in range(info.rank * per_rank, (info.rank + 1) * per_rank)]
    result = module.train_step(batches, 0)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.rank == 0:
        torch.save({"loss": result.loss, "grad_norm": result.grad_norm, "state": state}, out)
    if torch.distributed.is_initialized():
        # Leave together: a rank tearing down gloo while its peer still works can abort under load.
        torch.distributed.barrier()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
