"""Run mamba-ssm's Triton kernels on CPU under Triton's interpreter: what a process must do first.

`install()` sets ``TRITON_INTERPRET=1`` and patches the few things between mamba-ssm's launchers and
the interpreter; call it before anything imports triton or mamba_ssm (the interpreter is chosen
when ``@triton.jit`` decorates a kernel, i.e. when mamba_ssm's modules are imported). It changes
process-wide state, so it runs in a subprocess of its own
(tests/unit/test_triton_interpreter_parity.py), never inside the pytest process.

What it patches, and why:

- ``torch.cuda.device(i)``: every mamba-ssm launcher enters it around its kernel; with a CPU
  tensor's device index (None) it raises. A no-op here (the interpreter has no device to select).
- ``torch.cuda.get_device_properties(...).multi_processor_count``: the backward launchers size
  their grids by it (and it asserts on a torch without CUDA). A stub reporting `SM_COUNT`: so few
  that each program loops over several heads (SSD) or rows (norms), the path real model sizes
  take on a GPU.
- ``triton.autotune``: with more than one config the autotuner benchmarks them through the GPU
  driver, which the interpreter has not ("0 active drivers"). Each kernel keeps the one config
  mamba-ssm's own deterministic mode would pick (the smallest blocks; also the quickest to
  interpret, about half the time of the largest).
- The interpreter's integer-overflow checks (``sanitize_overflow``: every integer add and multiply
  is redone in int64 and compared): half of the run time, and they cannot fire at these shapes.
  Off, as in a GPU build without debug.
- The interpreter's bfloat16 (triton 3.x stores it as raw uint16 bits in numpy arrays):
  ``tl.dot`` multiplies those bits as integers, and float32 -> bfloat16 casts truncate instead of
  rounding to nearest even as the GPU and torch do. Both are replaced by exact bit conversions.
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

SM_COUNT = 4


def _f32_to_bf16_bits(values):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def _bf16_bits_to_f32(bits):
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    import numpy as np

    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _patch_interpreter_bfloat16() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    cast = InterpreterBuilder.cast_impl
    dot = InterpreterBuilder.create_dot

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            return TensorHandle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        if src_ty == tl.bfloat16 and dst_ty == tl.float32:
            return TensorHandle(_bf16_bits_to_f32(src.data), tl.float32)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # bfloat16 operands as the float32 values they hold: products are exact in float32 and the
        # tensor cores accumulate bf16 dots in float32 too.
        if a.dtype.scalar == tl.bfloat16:
            a = TensorHandle(_bf16_bits_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = TensorHandle(_bf16_bits_to_f32(b.data), tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.cast_impl = cast_impl  # create_fp_trunc / create_fp_ext call it by name
    InterpreterBuilder.create_dot = create_dot


def _skip_overflow_checks() -> None:
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def _keep_smallest_config(autotune):
    def smallest(config) -> int:
        size = 1
        for name, value in config.kwargs.items():
            if name.startswith("BLOCK_SIZE"):
                size *= value
        return size * (config.num_stages or 1)

    def one_config_autotune(configs, key, *args, **kwargs):
        return autotune([min(configs, key=smallest)], key, *args, **kwargs)

    return one_config_autotune


def install() -> None:
    """Make mamba-ssm's Triton kernels runnable on CPU tensors (see the module docstring)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import sys

    assert "mamba_ssm" not in sys.modules, "install() must run before mamba_ssm is imported"
    import torch
    import triton

    torch.cuda.device = lambda device=None: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(multi_processor_count=SM_COUNT)
    triton.autotune = _keep_smallest_config(triton.autotune)
    _skip_overflow_checks()
    _patch_interpreter_bfloat16()
