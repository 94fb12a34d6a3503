"""The two GEMMs an FP8 Linear of `fp8_emulated` can run on its quantised operands (`precision.fp8_gemm`).

Both take FP8 operands `a` (M, K) and `b` (K, N) with their inverse scales (float32 scalars) and
return (a @ b) * a_inv * b_inv in `out_dtype`:

- `emulated_gemm`: the FP8 values upcast to float32 and multiplied by torch's float32 matmul. Runs
  wherever torch does and is the reference.
- `scaled_mm_gemm`: real FP8 GEMMs through `torch._scaled_mm` (cuBLASLt on CUDA sm89+, oneDNN or
  its reference kernel on CPU), with per-tensor scales, as Transformer Engine's delayed scaling
  calls cuBLASLt.

Products of two FP8 values are exact in float32 (at most 4 x 4 significant bits, exponents well
inside float32's range), so the two differ only in how the K products are accumulated and when the
result is rounded to `out_dtype`.

`torch._scaled_mm` as used here is the subset stable since torch 2.4 (`out_dtype`, tensor-wise
scales, single-tensor return): `mat1` row-major, `mat2` column-major, mat1's K and mat2's K and N
multiples of 16 (M is free), scales float32 with one element, and not both operands E5M2
(`_scaled_mm_out_cuda` in aten/src/ATen/native/cuda/ScaledBlas.cpp). The feature dims are checked
once when the model is converted (`check_scaled_mm`); the token dim, the K of the weight-gradient
GEMM, is zero-padded here when it is not a multiple of 16 (packed FP8 batches are padded to 16
tokens per row already, so this is normally a no-op).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from train.config.schema import ConfigError

Fp8Gemm = Callable[[Tensor, Tensor, Tensor, Tensor, torch.dtype], Tensor]

# cuBLASLt's FP8 GEMM wants K and N in multiples of 16.
SCALED_MM_DIM_MULTIPLE = 16
# Output dtypes torch._scaled_mm writes besides FP8 itself; anything else comes via float32.
_SCALED_MM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def emulated_gemm(a: Tensor, b: Tensor, a_inv: Tensor, b_inv: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(a @ b) * (a_inv * b_inv) in float32 for FP8 a (M, K), b (K, N), cast to `out_dtype`."""
    return ((a.float() @ b.float()) * (a_inv * b_inv)).to(out_dtype)


def _pad_inner(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-pad K of a (M, K) and b (K, N) up to a multiple of 16: zero products add nothing."""
    pad = -a.shape[1] % SCALED_MM_DIM_MULTIPLE
    if not pad:
        return a, b
    # Through uint8 (byte 0 is +0.0 in both FP8 formats): padding kernels need not know FP8 dtypes.
    a = F.pad(a.view(torch.uint8), (0, pad)).view(a.dtype)  # (M, K + pad)
    b = F.pad(b.view(torch.uint8), (0, 0, 0, pad)).view(b.dtype)  # (K + pad, N)
    return a, b


def scaled_mm_gemm(a: Tensor, b: Tensor, a_inv: Tensor, b_inv: Tensor, out_dtype: torch.dtype) -> Tensor:
    """torch._scaled_mm(a, b) with the inverse scales as its dequantisation scales, in `out_dtype`."""
    a, b = _pad_inner(a, b)
    a = a.contiguous()  # row-major (M, K)
    b = b.t().contiguous().t()  # column-major (K, N); free when b is the transpose of a contiguous weight
    dtype = out_dtype if out_dtype in _SCALED_MM_OUT_DTYPES else torch.float32
    out = torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=dtype)  # (M, N)
    return out.to(out_dtype)


FP8_GEMMS: dict[str, Fp8Gemm] = {"emulated": emulated_gemm, "scaled_mm": scaled_mm_gemm}


def check_scaled_mm(features: dict[str, tuple[int, int]], device: torch.device,
                    operand_pairs: list[tuple[torch.dtype, torch.dtype]], out_dtypes: list[torch.dtype]) -> None:
    """Refuse at build time what `torch._scaled_mm` cannot run: FP8 Linears (name -> (out, in)
    features) whose features are not multiples of 16, and a device or torch build without the FP8
    GEMM (e.g. CUDA before sm89), found by running one 16x16 GEMM per operand pairing and output dtype."""
    odd = [f"{name} ({n_out}x{n_in})" for name, (n_out, n_in) in features.items()
           if n_out % SCALED_MM_DIM_MULTIPLE or n_in % SCALED_MM_DIM_MULTIPLE]
    if odd:
        raise ConfigError(f"precision.fp8_gemm=scaled_mm: torch._scaled_mm needs in/out features divisible by "
                          f"{SCALED_MM_DIM_MULTIPLE}; {len(odd)} FP8 Linear(s) are not, e.g. {odd[:3]}: add them to "
                          "precision.keep_patterns or set precision.fp8_gemm=emulated")
    n = SCALED_MM_DIM_MULTIPLE
    one = torch.ones((), dtype=torch.float32, device=device)
    for a_dtype, b_dtype in operand_pairs:
        for out_dtype in out_dtypes:
            a = torch.ones(n, n, device=device).to(a_dtype)
            b = torch.ones(n, n, device=device).to(b_dtype)
            try:
                out = scaled_mm_gemm(a, b, one, one, out_dtype)
            except (RuntimeError, ValueError, NotImplementedError, AttributeError) as err:
                raise ConfigError(f"precision.fp8_gemm=scaled_mm: torch {torch.__version__} cannot run an FP8 GEMM "
                                  f"({a_dtype} x {b_dtype} -> {out_dtype}) on {device} ({type(err).__name__}: {err}); "
                                  "set precision.fp8_gemm=emulated") from err
            if not bool((out.float() == n).all()):
                raise ConfigError(f"precision.fp8_gemm=scaled_mm: torch._scaled_mm on {device} returned a wrong "
                                  f"product for {a_dtype} x {b_dtype} -> {out_dtype}; set precision.fp8_gemm=emulated")
