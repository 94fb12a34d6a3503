"""torch's own varlen attention behind varlen (THD) attention: nothing to install, nothing to compile.

`torch.nn.attention.varlen.varlen_attn` (torch >= 2.11) runs FlashAttention-2 kernels shipped inside
torch's CUDA build (its cuDNN branch is switched off in 2.11-2.13) on packed rows: q (T_q, hq, d),
k/v (T_k, hkv, d), `cu_seq_q` / `cu_seq_k` boundaries, longest lengths as host ints.
:func:`torch_varlen_attention` has the exact signature of :func:`train.ops.varlen_attention_ref`, so
the model swaps it by config (`model.kernels.attention=torch_varlen`, see `train.ops.backends`).

Its signature moved between releases (read from the 2.11.0 and 2.13.0 wheels), so it is inspected
once, at import, and every call is mapped onto what this torch has:

  2.11  varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux, scale,
                    window_size=(-1, -1))
  2.13  ... the same, plus enable_gqa=False, seqused_k, block_table, num_splits

- causal: `window_size=(-1, 0)`. The wrapper compares the argument with the tuple `(-1, 0)` to set
  is_causal, so it must be a tuple (a list would silently give full attention). A torch whose
  varlen_attn takes `is_causal` instead (the 2.10 preview) gets that.
- GQA: 2.11 documents q, k, v with the same head count and has no `enable_gqa`; there the KV heads
  are expanded to the query heads (query head i reads kv head i // (hq // hkv), the reference's
  convention; autograd sums the copies' gradients back), otherwise `enable_gqa=True`.
- separate key boundaries (`cu_seqlens_k`, context parallelism's query pieces over their samples'
  keys): passed as `cu_seq_k`; the flash kernel aligns the causal mask bottom-right, as the reference.
- fp16/bf16 only (flash): float32 inputs are refused with what to set, never cast silently.
- tokens past ``cu_seqlens[-1]`` (a padded tail) never reach the kernel: they get zeros, as from the
  reference. The longest sample costs one device->host sync per call, as with flash-attn.
- the backward is aten's flash backward, deterministic under `torch.use_deterministic_algorithms(True)`
  (trainer.deterministic), the switch the other kernels read.

The import is guarded: on a torch without varlen_attn (or with a signature this module does not
know) this module still imports and ``IMPORT_ERROR`` says what is missing; `train.ops.dispatch`
turns that into a build-time error naming the torch to install.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import Tensor

from train.ops.backends.varlen import varlen_layout, zero_tail

__all__ = ["IMPORT_ERROR", "find_varlen_attn", "call_varlen_attn", "torch_varlen_attention"]

MIN_TORCH = "2.11"
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def find_varlen_attn() -> tuple[Callable[..., Tensor] | None, Exception | None]:
    """(torch's varlen_attn, None), or (None, an ImportError saying what this torch lacks)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as err:  # no torch.nn.attention.varlen before 2.10
        missing = ImportError(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn "
                              f"({type(err).__name__}: {err}); it ships with torch >= {MIN_TORCH} (CUDA build)")
        missing.__cause__ = err
        return None, missing
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        return None, ImportError(f"torch {torch.__version__}'s varlen_attn{inspect.signature(varlen_attn)} takes "
                                 "neither window_size nor is_causal: no causal mask can be asked for; use torch "
                                 f">= {MIN_TORCH}")
    return varlen_attn, None


varlen_attn, IMPORT_ERROR = find_varlen_attn()


@functools.cache
def _parameters(fn: Callable[..., Tensor]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)  # read once per function, not per call


def call_varlen_attn(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
                     max_q: int, max_k: int, causal: bool, softmax_scale: float | None) -> Tensor:
    """`fn` (a varlen_attn of one of the signatures above) on q (T_q, hq, d), k/v (T_k, hkv, d) ->
    (T_q, hq, d), with causality and GQA said the way `fn` takes them."""
    params = _parameters(fn)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    kwargs: dict[str, Any] = {"scale": softmax_scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)  # a tuple: compared with (-1, 0) inside
    else:
        kwargs["is_causal"] = causal
    if hq != hkv:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)  # (T_k, hq, d)
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def torch_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """Block-diagonal attention over packed samples with torch's varlen_attn.

    q: (total, hq, d); k, v: (total, hkv, d) (or (total_k, hkv, d) segmented by `cu_seqlens_k`);
    cu_seqlens: (n + 1,) -> (total, hq, d) in q's dtype.
    """
    if q.dtype not in _SIXTEEN_BIT or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"model.kernels.attention=torch_varlen runs torch's flash kernel on fp16/bf16 only, got q/k/v "
                        f"in {q.dtype}/{k.dtype}/{v.dtype}: compute in bf16 (precision=bf16, or "
                        "precision.compute_dtype=bf16) or set model.kernels.attention=torch")
    cu_q, max_q, covered = varlen_layout(q, cu_seqlens, "torch_varlen")
    if cu_seqlens_k is None:
        cu_k, max_k, k, v = cu_q, max_q, k[:covered], v[:covered]
    else:
        if cu_seqlens_k.numel() != cu_seqlens.numel():  # the kernel would pair pieces wrongly, silently
            raise ValueError(f"cu_seqlens ({cu_seqlens.numel() - 1} pieces) and cu_seqlens_k "
                             f"({cu_seqlens_k.numel() - 1}) differ")
        cu_k, max_k, _ = varlen_layout(k, cu_seqlens_k, "torch_varlen")
    out = call_varlen_attn(varlen_attn, q[:covered], k, v, cu_q, cu_k, max_q, max_k, causal,
                           softmax_scale)  # (covered, hq, d)
    return zero_tail(out, q.shape[0])
