"""torchrun worker: the megatron-core language model at a parallel layout (tensor x context, with or
without sequence parallelism) equals the native model on the same weights and packed rows: logits,
loss and gradients.

Every rank builds the same native model (same seed), loads its shard into the megatron model and
runs both on the same rows. The loss is the training loss: summed cross-entropy over this rank's
tokens through the vocabulary-parallel head, summed over context-parallel ranks; gradients are
summed over context-parallel ranks (as data-parallel wrapping does) and joined over tensor-parallel
ranks. Each rank writes the largest relative differences it sees.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.config.schema import KernelConfig, LanguageModelConfig, ParallelConfig
from train.model.language_model import HybridLanguageModel
from train.engines.mcore import weights
from train.engines.mcore.loss import vocab_parallel_chunk
from train.engines.mcore.model import McoreLanguageModel, initialize_megatron

PATTERNS = {"mamba_mlp": "M-M-M-", "hybrid": "M-M*M-*-"}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def full_gradients(model: McoreLanguageModel, lm: LanguageModelConfig) -> dict[str, torch.Tensor]:
    """Every rank's gradients: summed over context-parallel peers, joined over tensor-parallel ranks."""
    for p in model.model.parameters():
        if model.cp_size > 1:
            dist.all_reduce(p.grad, group=model.cp_group)
        if getattr(p, "sequence_parallel", False):  # partial per rank under SP (finalize_model_grads sums them)
            dist.all_reduce(p.grad, group=model.tp_group)
    return weights.megatron_to_native(model.gather_local({n: p.grad for n, p in model.model.named_parameters()}), lm)


def main(out: str, tensor: int, context: int, sequence_parallel: bool) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parallel = ParallelConfig(tensor_parallel=tensor, context_parallel=context, sequence_parallel=sequence_parallel)
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
        mcore.load_native_state(native.state_dict())
        # Two rows of 16, five samples: boundaries inside rows, at the row ends and inside CP chunks.
        ids = torch.randint(0, lm.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        cu = torch.tensor([0, 5, 11, 16, 25, 32], dtype=torch.int32)
        targets = torch.roll(ids, -1, dims=1)
        with torch.no_grad():
            logits = relative(mcore(ids, cu), native(ids, cu))
        hidden = mcore.hidden_states(mcore.embed_tokens(ids), None, cu)  # this rank's tokens
        local = vocab_parallel_chunk(hidden.flatten(0, 1), mcore.local_tokens(targets).flatten(),
                                     mcore.head_weight, torch.ones(hidden.shape[:2]).flatten())
        local.backward()
        loss = local.detach().clone()
        dist.all_reduce(loss, group=mcore.cp_group)
        expected = F.cross_entropy(native(ids, cu).flatten(0, 1), targets.flatten(), reduction="sum")
        expected.backward()
        grads = full_gradients(mcore, lm)
        results[name] = {
            "logits": logits, "loss": relative(loss, expected.detach()),
            "grads": max(relative(grads[k], p.grad) for k, p in native.named_parameters()),
            "samples_isolated": bool((native(ids, cu) - native(ids)).abs().max() > 1e-3),
        }
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "sp")
