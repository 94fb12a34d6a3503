"""Public Python API.

`load_language_model(path)` returns the hybrid LM of a native checkpoint or of a transformers
Nemotron-H directory (`nemotron_h`, or the LM of a `nemotron_h_omni` VL checkpoint) as an fp32
eval-mode module: `module(input_ids, cu_seqlens=None)` -> logits (B, L, V); with `cu_seqlens`
(int32 boundaries over a B == 1 packed row) the samples are isolated.
"""

from __future__ import annotations

from train.chat.load import load_language_model

__all__ = ["load_language_model"]
