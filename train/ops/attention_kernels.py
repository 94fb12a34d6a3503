"""Fused varlen (THD) attention: the one module importing flash_attn and transformer_engine.

Both functions have the exact signature of :func:`train.ops.varlen_attention_ref`, so the model
swaps them by config (`model.kernels.attention=flash_attn|transformer_engine`, see
`train.ops.dispatch`): q (total, hq, d), k/v (total, hkv, d) with samples concatenated along
``total`` and ``cu_seqlens`` (n + 1,) int32 marking their boundaries; causal inside each sample,
nothing across samples; GQA with query head i on kv head i // (hq // hkv).

What the kernels need: fp16/bf16 q/k/v (precision=bf16 autocast gives bf16 projections), the last
dim contiguous, head dim a multiple of 8 and <= 256, int32 cu_seqlens, and the longest sample's
length as a host int. That length costs one device->host sync per call. Tokens past
``cu_seqlens[-1]`` (a padded tail) never reach the kernels, which would leave them unwritten:
they get zeros, as from the reference.

- flash-attn 2 ``flash_attn_varlen_func``: the backward is deterministic when
  ``torch.use_deterministic_algorithms(True)`` is on (trainer.deterministic), matching what
  mamba_ssm and causal_conv1d read from the same switch.
- Transformer Engine ``DotProductAttention`` with ``qkv_format="thd"`` and a ``padding_causal``
  mask (``padding`` when not causal): TE picks cuDNN fused / flash / unfused itself (NVTE_*
  variables steer it). The module holds no parameters; one instance per head layout is built on
  first use and shared by all layers, so it is kept out of the model's state dict.

Imports are guarded: without a working library this module still imports and
``FLASH_ATTN_IMPORT_ERROR`` / ``TRANSFORMER_ENGINE_IMPORT_ERROR`` say why; `train.ops.dispatch`
turns that into an install hint at model build.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_varlen_func

    FLASH_ATTN_IMPORT_ERROR: Exception | None = None
except Exception as err:  # an ABI-mismatched CUDA extension raises ImportError or OSError
    FLASH_ATTN_IMPORT_ERROR = err

try:
    from transformer_engine.pytorch import DotProductAttention

    TRANSFORMER_ENGINE_IMPORT_ERROR: Exception | None = None
except Exception as err:  # a broken TE install raises RuntimeError, OSError, AssertionError...
    TRANSFORMER_ENGINE_IMPORT_ERROR = err

__all__ = [
    "FLASH_ATTN_IMPORT_ERROR",
    "TRANSFORMER_ENGINE_IMPORT_ERROR",
    "flash_varlen_attention",
    "te_varlen_attention",
]


def _varlen_layout(q: Tensor, cu_seqlens: Tensor, op: str) -> tuple[Tensor, int, int]:
    """(int32 cu_seqlens, longest sample, tokens covered by samples) with one host sync."""
    if not q.is_cuda:
        raise RuntimeError(f"model.kernels.attention={op} runs on CUDA tensors only, got {q.device}: "
                           "set model.kernels.attention=torch on this device")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen, covered = torch.stack([torch.diff(cu).max(), cu[-1]]).tolist()
    return cu, max_seqlen, covered


def _zero_tail(out: Tensor, total: int) -> Tensor:
    """(covered, h, d) -> (total, h, d), zero rows for the tokens past the last sample."""
    tail = total - out.shape[0]
    return F.pad(out, (0, 0, 0, 0, 0, tail)) if tail else out


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
        cu_q, max_q, covered = _varlen_layout(q, cu_seqlens, "flash_attn")
        cu_k, max_k, _ = _varlen_layout(k, cu_seqlens_k, "flash_attn")
        out = flash_attn_varlen_func(
            q[:covered], k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
        return _zero_tail(out, q.shape[0])
    cu, max_seqlen, covered = _varlen_layout(q, cu_seqlens, "flash_attn")
    out = flash_attn_varlen_func(
        q[:covered], k[:covered], v[:covered], cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
        softmax_scale=softmax_scale, causal=causal, deterministic=torch.are_deterministic_algorithms_enabled(),
    )  # (covered, hq, d)
    return _zero_tail(out, q.shape[0])


@functools.cache
def _dot_product_attention(hq: int, hkv: int, d: int, causal: bool, softmax_scale: float | None):
    return DotProductAttention(
        hq, d, num_gqa_groups=hkv, attention_dropout=0.0, qkv_format="thd",
        attn_mask_type="padding_causal" if causal else "padding", softmax_scale=softmax_scale,
    )


def te_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """Block-diagonal attention over packed samples with Transformer Engine (THD layout).

    q: (total, hq, d); k, v: (total, hkv, d); cu_seqlens: (n + 1,) -> (total, hq, d) in q's dtype.
    """
    if cu_seqlens_k is not None:  # refused at config time too (context parallelism with TE attention)
        raise NotImplementedError("separate key boundaries are not wired for Transformer Engine attention: "
                                  "use model.kernels.attention=flash_attn or torch")
    total, hq, d = q.shape
    cu, max_seqlen, covered = _varlen_layout(q, cu_seqlens, "transformer_engine")
    attention = _dot_product_attention(hq, k.shape[1], d, causal, softmax_scale)
    out = attention(
        q[:covered], k[:covered], v[:covered], qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen, attn_mask_type="padding_causal" if causal else "padding",
    )  # (covered, hq * d)
    return _zero_tail(out.reshape(covered, hq, d), total)
