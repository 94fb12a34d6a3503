"""Transformer Engine: the one module importing it (varlen attention here; the FP8 precision
plugin `train.precision.fp8_te` takes `te`, `DelayedScaling` and `Format` from this module).

:func:`te_varlen_attention` has the exact signature of :func:`train.ops.varlen_attention_ref`
(`model.kernels.attention=transformer_engine`, see `train.ops.backends`): ``DotProductAttention``
with ``qkv_format="thd"`` and a ``padding_causal`` mask (``padding`` when not causal); TE picks
cuDNN fused / flash / unfused itself (NVTE_* variables steer it). The module holds no parameters;
one instance per head layout is built on first use and shared by all layers, so it is kept out of
the model's state dict. Needs fp16/bf16 q/k/v, head dim a multiple of 8 and <= 256; tokens past
``cu_seqlens[-1]`` get zeros, as from the reference.

The import is guarded: with a missing or broken TE (which raises RuntimeError, OSError,
AssertionError... on import) this module still imports and ``IMPORT_ERROR`` says why.
"""

from __future__ import annotations

import functools

from torch import Tensor

from train.ops.backends.varlen import varlen_layout, zero_tail

try:
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format
    from transformer_engine.pytorch import DotProductAttention

    IMPORT_ERROR: Exception | None = None
except Exception as err:
    IMPORT_ERROR = err

__all__ = ["IMPORT_ERROR", "DelayedScaling", "Format", "te", "te_varlen_attention"]


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
    cu, max_seqlen, covered = varlen_layout(q, cu_seqlens, "transformer_engine")
    attention = _dot_product_attention(hq, k.shape[1], d, causal, softmax_scale)
    out = attention(
        q[:covered], k[:covered], v[:covered], qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen, attn_mask_type="padding_causal" if causal else "padding",
    )  # (covered, hq * d)
    return zero_tail(out.reshape(covered, hq, d), total)
