"""model.impl=mcore on CUDA without Transformer Engine: megatron-core's local spec (its own parallel
linears, our ops through the GPU kernels) in one NCCL process against the native engine on the same
weights and packed rows: logits, the training loss and its gradients (marked gpu; skipped without CUDA).

The loss is the one training uses on each engine: megatron's vocabulary-parallel cross-entropy
(`train.engines.mcore.loss.vocab_parallel_chunk`) against torch's on the native logits, summed, as in
tests/integration/mcore_parity_worker.py (which checks the multi-rank layouts on CPU with gloo).
float32 runs mamba-ssm's Triton kernels with the torch attention (the fused attention backends take
16-bit inputs only); bf16 parameters add torch's own varlen attention. tests/gpu/test_mcore_te.py
covers the Transformer Engine spec. A missing backend skips, or fails under REQUIRE_BACKENDS (tests/gpu/__init__.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from tests.gpu import missing_backend
from train.config.schema import KernelConfig, LanguageModelConfig, ParallelConfig
from train.model.language_model import HybridLanguageModel
from train.ops.dispatch import KernelUnavailableError

pytestmark = pytest.mark.gpu

MAMBA = dict(ssd="mamba_ssm", gated_norm="mamba_ssm", rms_norm="mamba_ssm")
CASES = {  # dtype, kernels, (logits, loss, gradients) bounds; None: gradients not compared
    "fp32_mamba": (torch.float32, KernelConfig(**MAMBA), (2e-3, 1e-3, 1e-2)),
    "bf16_mamba_torch_varlen": (torch.bfloat16, KernelConfig(**MAMBA, attention="torch_varlen"), (3e-2, 1e-2, None)),
}
LM = LanguageModelConfig(pattern="M-M*M-*-", hidden_size=256, vocab_size=512, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=64,
                         n_groups=2, chunk_size=64, mlp_hidden_size=512)
# One packed row of 512 tokens, three samples; the boundaries fall inside SSD chunks.
CU_SEQLENS = [0, 100, 357, 512]
GRAD_FLOOR = 1e-3  # of the largest gradient: some are near zero at initialisation (see test_model_gpu.py)


@pytest.fixture(scope="module")
def megatron_world():
    from train.engines.mcore.model import initialize_megatron

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    initialize_megatron(ParallelConfig(), torch.device("cuda"))
    yield torch.device("cuda")
    dist.destroy_process_group()


def relative(actual: Tensor, expected: Tensor, floor: float = 1e-12) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=floor))


def compare_engines(kernels: KernelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Relative differences mcore vs native: {"logits", "loss", "grads" (the worst parameter's), "worst"}."""
    from train.engines.mcore import weights
    from train.engines.mcore.loss import vocab_parallel_chunk
    from train.engines.mcore.model import McoreLanguageModel

    try:
        native = HybridLanguageModel(LM, kernels)
        mcore = McoreLanguageModel(LM, kernels, ParallelConfig(), device, params_dtype=dtype)
    except KernelUnavailableError as err:
        missing_backend(str(err))
    native.reset_parameters(torch.Generator().manual_seed(0))
    native = native.to(device, dtype)
    mcore.load_native_state(native.state_dict())
    ids = torch.randint(0, LM.vocab_size, (1, CU_SEQLENS[-1]), generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.roll(ids, -1, dims=1)
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=device)

    with torch.no_grad():
        logits = relative(mcore(ids, cu), native(ids, cu))
    hidden = mcore.hidden_states(mcore.embed_tokens(ids), None, cu)  # (1, L, D)
    loss = vocab_parallel_chunk(hidden.flatten(0, 1), targets.flatten(), mcore.head_weight,
                                torch.ones(ids.numel(), device=device))
    loss.backward()
    expected = F.cross_entropy(native(ids, cu).float().flatten(0, 1), targets.flatten(), reduction="sum")
    expected.backward()
    grads = weights.megatron_to_native(mcore.gather_local({n: p.grad for n, p in mcore.model.named_parameters()}), LM)
    reference = dict(native.named_parameters())
    assert grads.keys() == reference.keys()
    floor = GRAD_FLOOR * max(p.grad.float().abs().max().item() for p in reference.values())
    errors = {name: relative(grads[name], reference[name].grad, floor) for name in grads}
    worst = max(errors, key=errors.get)
    return {"logits": logits, "loss": relative(loss.detach(), expected.detach()), "grads": errors[worst], "worst": worst}


@pytest.mark.parametrize("case", list(CASES))
def test_mcore_local_spec_equals_native_engine(megatron_world, case):
    dtype, kernels, (logits_tol, loss_tol, grad_tol) = CASES[case]
    diff = compare_engines(kernels, dtype, megatron_world)
    assert diff["logits"] <= logits_tol, diff
    assert diff["loss"] <= loss_tol, diff
    if grad_tol is not None:
        assert diff["grads"] <= grad_tol, diff
