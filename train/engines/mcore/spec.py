"""The module spec of the hybrid stack for megatron-core's `MambaModel`.

Layers are megatron's (`MambaLayer`, `TransformerLayer` with `SelfAttention`, `MLPLayer` with
`MLP`), pre-norm and residual as Nemotron-H. What we supply: the Mamba mixer, the core attention
and the norms (`train.engines.mcore.layers`), computing through the configured op backends, and
the linears:
- "local": megatron's `ColumnParallelLinear` / `RowParallelLinear` (CPU with gloo, or GPU without
  Transformer Engine);
- "te": Transformer Engine's linears and its `DotProductAttention` (GPU; FP8; packed rows and
  context parallelism through TE). Parameter names are the same in both, so checkpoints move
  between them.
`MambaStack` builds its final norm with Transformer Engine unconditionally; `HybridStack` builds
ours instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch.utils.checkpoint import checkpoint

from train.config.schema import LanguageModelConfig
from train.engines.mcore.layers import MambaMixer, PackedCoreAttention, RMSNorm
from train.ops.dispatch import Kernels

SpecKind = Literal["local", "te"]


class HybridStack(MambaStack):
    """megatron's MambaStack with our final norm in place of its Transformer Engine one, and with
    `model.kernels.activation_checkpointing=layers` as the native model does it: each layer keeps
    only its input and reruns in backward (its collectives too, in the same order on every rank)."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, kernels: Kernels = None,
                 checkpoint_layers: bool = False, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm  # read by forward()
        if self.post_process and post_layer_norm:
            self.final_norm = RMSNorm(config, config.hidden_size, kernels=kernels)
        if checkpoint_layers:
            rerun = _recomputed_in_fp8 if config.fp8 else _recomputed
            for layer in self.layers:  # an instance attribute: parameter names stay as they are
                layer.forward = functools.partial(rerun, layer.forward)


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _recomputed_in_fp8(forward, *args, **kwargs):
    """Under FP8, Transformer Engine's checkpoint: the rerun in backward happens inside the FP8
    context with the forward's scales (torch's would rerun the layer outside it)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from train.ops.backends import transformer_engine as te_backend

    return te_backend.te.checkpoint(forward, *args, use_reentrant=False, get_rng_state_tracker=get_cuda_rng_tracker,
                                    **kwargs)


def hybrid_stack_spec(lm: LanguageModelConfig, kernels: Kernels, kind: SpecKind = "local",
                      checkpoint_layers: bool = False) -> ModuleSpec:
    if kind == "te":
        # Imported here: Transformer Engine exists only in GPU installs.
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TERowParallelLinear,
        )

        column, row, core_attention = TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        column, row = ColumnParallelLinear, RowParallelLinear
        core_attention = ModuleSpec(module=PackedCoreAttention, params={"kernels": kernels})
    norm = ModuleSpec(module=RMSNorm, params={"kernels": kernels})
    return ModuleSpec(
        module=HybridStack,
        params={"kernels": kernels, "checkpoint_layers": checkpoint_layers},
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=norm,
                    mixer=ModuleSpec(module=MambaMixer, params={"lm": lm, "kernels": kernels},
                                     submodules=_MixerLinears(in_proj=column, out_proj=row)),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core_attention,
                                                           linear_proj=row),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
        ),
    )


@dataclass
class _MixerLinears:
    """The mixer's two projections (as megatron's MambaMixerSubmodules)."""

    in_proj: type
    out_proj: type
