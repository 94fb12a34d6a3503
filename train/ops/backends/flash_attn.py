"""flash-attn 2 behind varlen (THD) attention: the one module importing flash_attn.

:func:`flash_varlen_attention` has the exact signature of :func:`train.ops.varlen_attention_ref`, so
the model swaps it by config (`model.kernels.attention=flash_attn`, see `train.ops.backends`):
q (total, hq, d), k/v (total, hkv, d) with samples concatenated along ``total`` and
``cu_seqlens`` (n + 1,) int32 marking their boundaries; causal inside each sample, nothing across
samples; GQA with query head i on kv head i // (hq // hkv).

What the kernel needs: fp16/bf16 q/k/v (precision=bf16 autocast gives bf16 projections), the last
dim contiguous, head dim a multiple of 8 and <= 256, int32 cu_seqlens, and the longest sample's
length as a host int. That length costs one device->host sync per call. Tokens past
``cu_seqlens[-1]`` (a padded tail) never reach the kernel, which would leave them unwritten: they
get zeros, as from the reference. The backward is deterministic when
``torch.use_deterministic_algorithms(True)`` is on (trainer.deterministic), matching what mamba_ssm
and causal_conv1d read from the same switch.

The import is guarded: without a working flash-attn this module still imports and
``IMPORT_ERROR`` says why; `train.ops.dispatch` turns that into an install hint at model build.
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.ops.backends.varlen import varlen_layout, zero_tail

try:
    from flash_attn import flash_attn_varlen_func

    IMPORT_ERROR: Exception | None = None
except Exception as err:  # an ABI-mismatched CUDA extension raises ImportError or OSError
    IMPORT_ERROR = err

__all__ = ["IMPORT_ERROR", "flash_varlen_attention"]


def flash_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """Block-diagonal attention over packed samples with flash-attn 2 (varlen).

    q: (total, hq, d); k, v: (total, hkv, d); cu_seqlens: (n + 1,) -> (total, hq, d) in q's dtype.
    With `cu_seqlens_k` keys are segmented on their own; flash-attn >= 2.1 aligns the causal mask
    bottom-right when a piece has more keys than queries, as the reference does.
    """
    if cu_seqlens_k is not None:
        cu_q, max_q, covered = varlen_layout(q, cu_seqlens, "flash_attn")
        cu_k, max_k, _ = varlen_layout(k, cu_seqlens_k, "flash_attn")
        out = flash_attn_varlen_func(
            q[:covered], k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
        return zero_tail(out, q.shape[0])
    cu, max_seqlen, covered = varlen_layout(q, cu_seqlens, "flash_attn")
    out = flash_attn_varlen_func(
        q[:covered], k[:covered], v[:covered], cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
        softmax_scale=softmax_scale, causal=causal, deterministic=torch.are_deterministic_algorithms_enabled(),
    )  # (covered, hq, d)
    return zero_tail(out, q.shape[0])
