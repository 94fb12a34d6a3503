"""torchrun worker: the megatron-core language model at a tensor-parallel layout equals the native
model on the same weights and packed rows: logits, loss and gradients.

Every rank builds the same native model (same seed), shards its weights for its rank, runs both
models on the same rows and writes the largest relative differences it sees.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.config.schema import KernelConfig, LanguageModelConfig, ParallelConfig
from train.model.language_model import HybridLanguageModel
from train.model.mcore import weights
from train.model.mcore.model import McoreLanguageModel, initialize_megatron

PATTERNS = {"mamba_mlp": "M-M-M-", "hybrid": "M-M*M-*-"}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def full_gradients(model: McoreLanguageModel, lm: LanguageModelConfig, tp: int) -> dict[str, torch.Tensor]:
    """Every rank's gradients, joined into whole native-named tensors."""
    for p in model.model.parameters():
        if getattr(p, "sequence_parallel", False):  # partial per rank under SP (finalize_model_grads sums them)
            dist.all_reduce(p.grad, group=model.tp_group)
    local = {name: p.grad for name, p in model.model.named_parameters()}
    shards = [dict() for _ in range(tp)]
    for name, grad in local.items():
        parts = [torch.empty_like(grad) for _ in range(tp)]
        dist.all_gather(parts, grad.contiguous(), group=model.tp_group)
        for rank, part in enumerate(parts):
            shards[rank][name] = part
    return weights.megatron_to_native(weights.unshard_state(shards, lm), lm)


def main(out: str, sequence_parallel: bool) -> None:
    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    parallel = ParallelConfig(tensor_parallel=tp, sequence_parallel=sequence_parallel)
    device = torch.device("cpu")
    initialize_megatron(parallel, device)
    results = {}
    for name, pattern in PATTERNS.items():
        lm = LanguageModelConfig(pattern=pattern, hidden_size=64, vocab_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
                                 ssm_state_size=16, n_groups=2, chunk_size=8, mlp_hidden_size=96)
        native = HybridLanguageModel(lm)
        native.reset_parameters(torch.Generator().manual_seed(0))
        mcore = McoreLanguageModel(lm, KernelConfig(), parallel, device)
        weights.load_local_state(mcore.model, weights.shard_state(weights.native_to_megatron(native.state_dict(), lm),
                                                                  lm, rank, tp))
        # Two rows of 16, five samples: boundaries inside rows and at the row ends.
        ids = torch.randint(0, lm.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        cu = torch.tensor([0, 5, 11, 16, 25, 32], dtype=torch.int32)
        targets = torch.roll(ids, -1, dims=1)
        losses = []
        for model in (mcore, native):
            logits = model(ids, cu)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            losses.append((logits.detach(), loss.detach()))
        (m_logits, m_loss), (n_logits, n_loss) = losses
        grads = full_gradients(mcore, lm, tp)
        results[name] = {
            "logits": relative(m_logits, n_logits), "loss": relative(m_loss, n_loss),
            "grads": max(relative(grads[k], p.grad) for k, p in native.named_parameters()),
            "samples_isolated": bool((native(ids, cu) - native(ids)).abs().max() > 1e-3),
        }
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "sp")
