"""Attention over packed (THD) sequences: pure-torch reference twins.

:func:`varlen_attention_ref` stands in for flash-attn's
``flash_attn_varlen_func`` / Transformer Engine THD attention: tokens of all
samples are concatenated along one axis and ``cu_seqlens`` marks the sample
boundaries. Attention is block-diagonal (causal inside each block) so packed
samples never see each other. It loops over samples and calls torch SDPA per
sample with KV heads expanded, which CPU SDPA runs with its fused flash kernel: memory is
O(total), never a (len, len) score matrix.

:func:`attention_with_kv_cache_ref` is the one-token decoding counterpart of
``flash_attn_with_kvcache``.

GQA: ``hq % hkv == 0``; query head ``i`` uses kv head ``i // (hq // hkv)``
(the flash-attn / SDPA ``enable_gqa`` convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["varlen_attention_ref", "attention_with_kv_cache_ref"]


def _check_gqa(hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")


def varlen_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """Block-diagonal (optionally causal) attention over packed samples.

    Args:
        q: (total, hq, d); k, v: (total, hkv, d).
        cu_seqlens: (n + 1,) int32 cumulative boundaries, ``cu_seqlens[0] == 0``.
            Tokens past ``cu_seqlens[-1]`` (tail padding) get zero output.
        causal: causal mask inside each sample.
        softmax_scale: defaults to ``d ** -0.5``.
        cu_seqlens_k: keys and values segmented on their own (as flash-attn's ``cu_seqlens_k``):
            piece i's queries ``q[cu_seqlens[i]:cu_seqlens[i+1]]`` attend to its keys
            ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]``, causally aligned bottom-right (the queries are
            the last of the piece's key positions). Context parallelism uses it: a rank's queries
            over every rank's keys.

    Returns:
        (total, hq, d) in ``q.dtype``.
    """
    if cu_seqlens_k is not None:
        return _attention_q_over_k(q, k, v, cu_seqlens, cu_seqlens_k, causal, softmax_scale)
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(
            f"expected q (total, hq, d) and k == v shape (total, hkv, d), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    total, hq, _ = q.shape
    hkv = k.shape[1]
    _check_gqa(hq, hkv)
    if k.shape[0] != total:
        raise ValueError(f"q has {total} tokens but k/v have {k.shape[0]}")
    bounds = [int(c) for c in cu_seqlens.tolist()]
    if not bounds or bounds[0] != 0 or any(e < s for s, e in zip(bounds, bounds[1:])) or bounds[-1] > total:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end <= {total}, got {bounds}")

    # KV heads expanded to the query heads: with grouped heads (`enable_gqa`) CPU SDPA takes its math
    # path and materialises the (len, len) scores; with equal heads it takes the fused flash kernel
    # (7x faster fwd + bwd at 4K tokens, O(len) memory). The expansion costs (hq / hkv - 1) copies
    # of K and V, small next to the scores it saves.
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)  # (total, hq, d)
    out = q.new_zeros(q.shape)
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)[None]  # (1, hq, len, d)
        ks = k[start:end].transpose(0, 1)[None]
        vs = v[start:end].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)  # (1, hq, len, d)
        out[start:end] = o[0].transpose(0, 1)
    return out


def _attention_q_over_k(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool,
                        softmax_scale: float | None) -> Tensor:
    q_bounds, k_bounds = cu_q.tolist(), cu_k.tolist()
    if len(q_bounds) != len(k_bounds):
        raise ValueError(f"cu_seqlens ({len(q_bounds) - 1} pieces) and cu_seqlens_k ({len(k_bounds) - 1}) differ")
    _check_gqa(q.shape[1], k.shape[1])
    out = q.new_zeros(q.shape)
    for (qs, qe), (ks, ke) in zip(zip(q_bounds, q_bounds[1:]), zip(k_bounds, k_bounds[1:])):
        if qe == qs:
            continue
        lq, lk = qe - qs, ke - ks
        if lk < lq:
            raise ValueError(f"a piece has {lq} queries but only {lk} keys: queries must be the last key positions")
        mask = None
        if causal:  # bottom-right: query i sits at key position i + lk - lq
            mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1),
                                           attn_mask=mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        out[qs:qe] = o.transpose(0, 1)  # (lq, hq, d)
    return out


def attention_with_kv_cache_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    softmax_scale: float | None = None,
    *,
    cache_seqlens: Tensor | None = None,
) -> Tensor:
    """Attention of one new query token per row over its cached keys/values.

    The new token's own k/v must already be written into the cache. No causal
    mask is needed for a single query: everything valid in the cache is past.

    Args:
        q: (b, hq, d); k_cache, v_cache: (b, t, hkv, d).
        softmax_scale: defaults to ``d ** -0.5``.
        cache_seqlens: optional (b,) number of valid cache entries per row
            (keyword-only extra, as flash_attn_with_kvcache); default all ``t``.

    Returns:
        (b, hq, d) in ``q.dtype``.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    _check_gqa(hq, hkv)
    mask = None
    if cache_seqlens is not None:
        t = k_cache.shape[1]
        valid = torch.arange(t, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]  # (b, t)
        mask = valid[:, None, None, :]  # (b, 1, 1, t)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # (b, hq, 1, d)
        k_cache.transpose(1, 2),  # (b, hkv, t, d)
        v_cache.transpose(1, 2),
        attn_mask=mask,
        scale=softmax_scale,
        enable_gqa=hq != hkv,
    )  # (b, hq, 1, d)
    return o.squeeze(2)
