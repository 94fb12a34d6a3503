"""Pure-torch reference ops (CPU), the ground truth for every fused GPU kernel.

Each function mirrors the signature of the kernel it stands in for
(mamba_ssm ``mamba_chunk_scan_combined`` / ``selective_state_update``,
causal_conv1d ``causal_conv1d_fn`` / ``causal_conv1d_update``, flash-attn
varlen / Transformer Engine THD attention, Mamba ``RMSNormGated``), so a kernel
backend is a drop-in swap chosen by config. All of them isolate packed samples
(``seq_idx`` / ``cu_seqlens``): a packed row computes what each sample would
compute alone.
"""

from train.ops.attention import attention_with_kv_cache_ref, varlen_attention_ref
from train.ops.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from train.ops.norms import gated_rms_norm_ref, rms_norm_ref
from train.ops.ssd import ssd_recurrent_ref, ssd_scan_ref, ssd_step_ref

__all__ = [
    "attention_with_kv_cache_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "gated_rms_norm_ref",
    "rms_norm_ref",
    "ssd_recurrent_ref",
    "ssd_scan_ref",
    "ssd_step_ref",
    "varlen_attention_ref",
]
