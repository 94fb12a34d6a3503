"""What the fused varlen attention backends share: boundaries as the kernels take them, and the
zero rows of a padded tail. No GPU library is imported here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def varlen_layout(q: Tensor, cu_seqlens: Tensor, op: str) -> tuple[Tensor, int, int]:
    """(int32 cu_seqlens, longest sample, tokens covered by samples) with one host sync."""
    if not q.is_cuda:
        raise RuntimeError(f"model.kernels.attention={op} runs on CUDA tensors only, got {q.device}: "
                           "set model.kernels.attention=torch on this device")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen, covered = torch.stack([torch.diff(cu).max(), cu[-1]]).tolist()
    return cu, max_seqlen, covered


def zero_tail(out: Tensor, total: int) -> Tensor:
    """(covered, h, d) -> (total, h, d), zero rows for the tokens past the last sample."""
    tail = total - out.shape[0]
    return F.pad(out, (0, 0, 0, 0, 0, tail)) if tail else out
