"""Hybrid Mamba2 / attention / MLP decoder (Nemotron-H layout), packed-sequence aware.

Parameter names follow transformers' `nemotron_h` (backbone.layers.N.mixer.in_proj, ...), so
HF import/export is a key-for-key copy. Nemotron-H uses no positional embedding: Mamba layers
carry order. Every mixer isolates packed samples: attention by `cu_seqlens`, Mamba conv and
scan by `seq_idx`. Which function computes each op (torch reference or a GPU kernel) comes from
`model.kernels`, resolved once at build (`train.ops.dispatch`); modules store the chosen ones.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from train.config.schema import KernelConfig, LanguageModelConfig
from train.ops import rms_norm_ref
from train.ops.dispatch import Kernels, resolve_kernels


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, norm_fn: Callable[..., Tensor] = rms_norm_ref):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.norm_fn = norm_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_fn(x, self.weight, self.eps)


class Mamba2Mixer(nn.Module):
    """in_proj -> [z | xBC | dt]; causal conv over xBC; chunked SSD scan; gated RMSNorm; out_proj."""

    def __init__(self, cfg: LanguageModelConfig, kernels: Kernels):
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        self.num_heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.inner = cfg.mamba_intermediate_size
        self.groups_state = cfg.n_groups * cfg.ssm_state_size
        self.conv_dim = self.inner + 2 * self.groups_state
        self.in_proj = nn.Linear(cfg.hidden_size, self.inner + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                padding=cfg.conv_kernel - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = RMSNorm(self.inner, cfg.norm_eps)
        self.out_proj = nn.Linear(self.inner, cfg.hidden_size, bias=False)
        # transformers' NemotronHMamba2Mixer floors the discretised step at time_step_min (no upper
        # limit) whatever config.time_step_limit says; matching it keeps HF logits equal to ours.
        self.dt_limit = (cfg.time_step_min, math.inf)

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        # dt drawn log-uniformly in [time_step_min, time_step_max]; dt_bias = softplus^-1(dt).
        dt = torch.exp(torch.rand(self.num_heads, generator=generator) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                       + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)

    def forward(self, hidden: Tensor, seq_idx: Tensor, cu_seqlens: Tensor) -> Tensor:
        b, l, _ = hidden.shape
        z, xbc, dt = torch.split(self.in_proj(hidden), [self.inner, self.conv_dim, self.num_heads], dim=-1)
        xbc = self.kernels.conv1d(xbc.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                  seq_idx, activation="silu").transpose(1, 2)  # (b, l, conv_dim)
        x, B, C = torch.split(xbc, [self.inner, self.groups_state, self.groups_state], dim=-1)
        y = self.kernels.ssd(
            x.reshape(b, l, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, l, self.cfg.n_groups, -1), C.reshape(b, l, self.cfg.n_groups, -1), self.cfg.chunk_size,
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, seq_idx=seq_idx, dt_limit=self.dt_limit,
        )  # (b, l, h, p)
        y = self.kernels.gated_norm(y.reshape(b, l, self.inner), z, self.norm.weight, self.cfg.norm_eps,
                                    group_size=self.inner // self.cfg.n_groups)
        return self.out_proj(y)


class Attention(nn.Module):
    """Causal GQA without positional embedding, block-diagonal over packed samples."""

    def __init__(self, cfg: LanguageModelConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, hidden: Tensor, seq_idx: Tensor, cu_seqlens: Tensor) -> Tensor:
        b, l, _ = hidden.shape
        # THD layout: the batch is one flattened packed row, boundaries in cu_seqlens.
        q = self.q_proj(hidden).reshape(b * l, self.heads, self.head_dim)
        k = self.k_proj(hidden).reshape(b * l, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden).reshape(b * l, self.kv_heads, self.head_dim)
        out = self.kernels.attention(q, k, v, cu_seqlens, causal=True)  # (b*l, heads, head_dim)
        return self.o_proj(out.reshape(b, l, -1))


class SquaredReluMLP(nn.Module):
    # `kernels` is unused (plain matmuls); taken so that every mixer is built the same way.
    def __init__(self, cfg: LanguageModelConfig, kernels: Kernels):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.mlp_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, hidden: Tensor, seq_idx: Tensor, cu_seqlens: Tensor) -> Tensor:
        return self.down_proj(F.relu(self.up_proj(hidden)).square())


MIXERS = {"M": Mamba2Mixer, "*": Attention, "-": SquaredReluMLP}


class HybridBlock(nn.Module):
    """Pre-norm residual block around one mixer."""

    def __init__(self, cfg: LanguageModelConfig, kind: str, kernels: Kernels):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernels.rms_norm)
        self.mixer = MIXERS[kind](cfg, kernels)

    def forward(self, hidden: Tensor, seq_idx: Tensor, cu_seqlens: Tensor) -> Tensor:
        return hidden + self.mixer(self.norm(hidden), seq_idx, cu_seqlens)


class Backbone(nn.Module):
    def __init__(self, cfg: LanguageModelConfig, kernels: Kernels, activation_checkpointing: bool = False):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(cfg, kind, kernels) for kind in cfg.pattern)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernels.rms_norm)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, embeds: Tensor, seq_idx: Tensor, cu_seqlens: Tensor) -> Tensor:
        hidden = embeds
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only the layer's input; backward reruns its forward (same kernels, same autocast).
                hidden = checkpoint(layer, hidden, seq_idx, cu_seqlens, use_reentrant=False)
            else:
                hidden = layer(hidden, seq_idx, cu_seqlens)
        return self.norm_f(hidden)


class HybridLanguageModel(nn.Module):
    """Backbone + untied output head. `forward` returns logits (B, L, V) for inference; training
    uses `backbone` and the chunked loss so full logits are never materialised."""

    def __init__(self, cfg: LanguageModelConfig, kernels: KernelConfig | None = None):
        super().__init__()
        self.cfg = cfg
        kernels = kernels or KernelConfig()
        # A configured GPU kernel whose library is missing fails here, with the pip package to install.
        self.backbone = Backbone(cfg, resolve_kernels(kernels), kernels.activation_checkpointing == "layers")
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                # torch's default conv init, drawn from our generator so init depends on the seed only.
                bound = 1 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.weight, -bound, bound, generator=generator)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, Mamba2Mixer):
                module.reset_ssm_parameters(generator)
        # Scale residual output projections by depth (GPT-2 style) for a stable start.
        for layer in self.backbone.layers:
            for name in ("out_proj", "o_proj", "down_proj"):
                proj = getattr(layer.mixer, name, None)
                if proj is not None:
                    proj.weight.div_(math.sqrt(2 * len(self.cfg.pattern)))

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        seq_idx, cu_seqlens = packing_metadata(input_ids.shape, cu_seqlens, input_ids.device)
        hidden = self.backbone(self.backbone.embeddings(input_ids), seq_idx, cu_seqlens)
        return self.lm_head(hidden)


def packing_metadata(shape: torch.Size, cu_seqlens: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(seq_idx (B, L), cu_seqlens over the flattened B*L tokens) for a batch.

    Without `cu_seqlens` every row is one sample. With it (boundaries over a B == 1 packed row, or
    over the flattened batch), `seq_idx` numbers the segments.
    """
    b, l = shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (b + 1) * l, l, dtype=torch.int32, device=device)
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != b * l:
        raise ValueError(f"cu_seqlens must run from 0 to B*L={b * l}, got {cu_seqlens.tolist()[:3]}...{int(cu_seqlens[-1])}")
    lengths = torch.diff(cu_seqlens)
    seq_idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=device, dtype=torch.int32), lengths)
    return seq_idx.reshape(b, l), cu_seqlens
