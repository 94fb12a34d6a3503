"""Hybrid Mamba2 / attention / MLP decoder (Nemotron-H layout), packed-sequence aware.

Parameter names follow transformers' `nemotron_h` (backbone.layers.N.mixer.in_proj, ...), so
HF import/export is a key-for-key copy. Nemotron-H uses no positional embedding: Mamba layers
carry order. Every mixer isolates packed samples: attention by `cu_seqlens`, Mamba conv and
scan by `seq_idx`. Which function computes each op (torch reference or a GPU kernel) comes from
`model.kernels`, resolved once at build (`train.ops.dispatch`); modules store the chosen ones.

Inference lives on the modules too (as mamba's modules own their cache): every mixer can
`allocate_cache`, fill it while running a prompt (its `forward` with a `cache`: prefill) and
advance it by one token (`step`). Prefill is the training forward itself, so a mixer is written
once; `step` uses the torch step twins of the ops (`causal_conv1d_update_ref`, `ssd_step_ref`,
`attention_with_kv_cache_ref`), so a new token costs O(1) in Mamba layers and O(t) in attention
layers. Caches hold one sample per row (unpacked prompts); prompts of different lengths, prefilled
one by one, decode together once their caches are stacked (`stack_caches`): each row keeps its own
length, so no row ever sees padding (a Mamba state could not skip it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.config.schema import KernelConfig, LanguageModelConfig
from train.model.recompute import recompute_in_backward
from train.ops import attention_with_kv_cache_ref, causal_conv1d_update_ref, rms_norm_ref, ssd_step_ref
from train.ops.activations import squared_relu
from train.ops.dispatch import Kernels, resolve_kernels


@dataclass
class MambaCache:
    conv: Tensor  # (B, conv_dim, conv_kernel - 1): the conv's last inputs (pre-activation xBC), oldest first
    ssm: Tensor  # (B, H, P, N), float32 or wider


@dataclass
class AttentionCache:
    keys: Tensor  # (B, capacity, kv_heads, head_dim); positions >= InferenceCache.length are unused
    values: Tensor  # (B, capacity, kv_heads, head_dim)


LayerCache = MambaCache | AttentionCache | None  # None: MLP layers remember nothing


@dataclass
class InferenceCache:
    layers: list[LayerCache]  # one per layer
    length: int  # tokens consumed so far (the longest row's, in a ragged batch)
    capacity: int  # tokens the attention buffers hold
    # (B,) tokens consumed by each row where rows differ (a ragged batch, `stack_caches`); None: all `length`.
    lengths: Tensor | None = None


def stack_caches(caches: list[InferenceCache]) -> InferenceCache:
    """The rows of several caches (prompts of different lengths, each prefilled alone with the same
    capacity) as one batch that decodes together: Mamba states stacked, each row's keys and values
    where its prompt left them, and its own length, so attention reads only that row's entries."""
    capacity = caches[0].capacity
    if any(c.capacity != capacity for c in caches):
        raise ValueError(f"caches stack only at one capacity, got {sorted({c.capacity for c in caches})}")
    layers: list[LayerCache] = []
    for parts in zip(*(c.layers for c in caches)):
        if isinstance(parts[0], MambaCache):
            layers.append(MambaCache(torch.cat([p.conv for p in parts]), torch.cat([p.ssm for p in parts])))
        elif isinstance(parts[0], AttentionCache):
            layers.append(AttentionCache(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts])))
        else:
            layers.append(None)
    lengths = torch.cat([c.lengths if c.lengths is not None else torch.full((batch_rows(c),), c.length)
                         for c in caches])  # (B,)
    return InferenceCache(layers, int(lengths.max()), capacity, lengths)


def batch_rows(cache: InferenceCache) -> int:
    for layer in cache.layers:
        if isinstance(layer, MambaCache):
            return layer.conv.shape[0]
        if isinstance(layer, AttentionCache):
            return layer.keys.shape[0]
    raise ValueError("a cache without Mamba or attention layers has no rows")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, norm_fn: Callable[..., Tensor] = rms_norm_ref):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.norm_fn = norm_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_fn(x, self.weight, self.eps)


def mamba_dt_limit(cfg: LanguageModelConfig) -> tuple[float, float]:
    """The clamp on the discretised time step: `time_step_limit`, (0, inf) unless a config sets it, as
    megatron-core's MambaMixer and transformers' NemotronH apply it (`time_step_min` only initialises)."""
    low, high = cfg.time_step_limit
    return (float(low), float(high))


def mamba_scan(mixer: nn.Module, zxbcdt: Tensor, seq_idx: Tensor | None,
               cache: MambaCache | None = None) -> tuple[Tensor, Tensor]:
    """What a Mamba2 mixer computes between its in_proj and its gated norm, shared by the native mixer
    and the megatron-core one (`train.engines.mcore.layers`), which holds its rank's heads:
    in_proj output (B, L, inner + conv_dim + H) = [z | x B C | dt] -> causal conv over xBC and the
    chunked SSD scan -> (y (B, L, inner), z (B, L, inner)).

    `mixer` provides `conv1d` (`.weight`, `.bias`), `dt_bias`, `A_log`, `D`, `kernels` and the sizes
    `num_heads`, `head_dim`, `n_groups`, `inner`, `groups_state`, `conv_dim`, `conv_kernel`,
    `chunk_size`, `dt_limit`. With `cache` (prefill: one sample per row) it also keeps the conv
    inputs of the last `conv_kernel - 1` tokens and the SSM state after the last token.
    """
    b, l, _ = zxbcdt.shape
    z, xbc, dt = torch.split(zxbcdt, [mixer.inner, mixer.conv_dim, mixer.num_heads], dim=-1)
    xbc = xbc.transpose(1, 2)  # (b, conv_dim, l)
    if cache is not None:
        # A prompt shorter than the window is left-padded with the zeros the conv reads there.
        width = mixer.conv_kernel - 1
        cache.conv.copy_(F.pad(xbc, (max(0, width - l), 0))[..., -width:])
    xbc = mixer.kernels.conv1d(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, seq_idx,
                               activation="silu").transpose(1, 2)  # (b, l, conv_dim)
    x, B, C = torch.split(xbc, [mixer.inner, mixer.groups_state, mixer.groups_state], dim=-1)
    y = mixer.kernels.ssd(
        x.reshape(b, l, mixer.num_heads, mixer.head_dim), dt, -torch.exp(mixer.A_log.float()),
        B.reshape(b, l, mixer.n_groups, -1), C.reshape(b, l, mixer.n_groups, -1), mixer.chunk_size,
        D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True, seq_idx=seq_idx, dt_limit=mixer.dt_limit,
        return_final_states=cache is not None,
    )  # (b, l, h, p)
    if cache is not None:
        y, final_state = y
        cache.ssm.copy_(final_state)  # (b, h, p, n)
    return y.reshape(b, l, mixer.inner), z


def mamba_mix(mixer: nn.Module, zxbcdt: Tensor, seq_idx: Tensor | None, cache: MambaCache | None = None) -> Tensor:
    """`mamba_scan`, then the gated RMSNorm (`mixer.norm`, per group of `inner // n_groups` channels)
    -> (B, L, inner), the input of out_proj."""
    y, z = mamba_scan(mixer, zxbcdt, seq_idx, cache)
    return mixer.kernels.gated_norm(y, z, mixer.norm.weight, mixer.norm_eps, group_size=mixer.inner // mixer.n_groups)


class Mamba2Mixer(nn.Module):
    """in_proj -> [z | xBC | dt]; causal conv over xBC; chunked SSD scan; gated RMSNorm; out_proj."""

    def __init__(self, cfg: LanguageModelConfig, kernels: Kernels):
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        self.num_heads, self.head_dim, self.n_groups = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups
        self.inner = cfg.mamba_intermediate_size
        self.groups_state = cfg.n_groups * cfg.ssm_state_size
        self.conv_dim = self.inner + 2 * self.groups_state
        self.conv_kernel, self.chunk_size, self.norm_eps = cfg.conv_kernel, cfg.chunk_size, cfg.norm_eps
        self.dt_limit = mamba_dt_limit(cfg)
        self.in_proj = nn.Linear(cfg.hidden_size, self.inner + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                padding=cfg.conv_kernel - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = RMSNorm(self.inner, cfg.norm_eps)
        self.out_proj = nn.Linear(self.inner, cfg.hidden_size, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        # dt drawn log-uniformly in [time_step_min, time_step_max]; dt_bias = softplus^-1(dt).
        dt = torch.exp(torch.rand(self.num_heads, generator=generator) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                       + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)

    def allocate_cache(self, batch_size: int, capacity: int) -> MambaCache:
        weight = self.in_proj.weight
        conv = weight.new_zeros(batch_size, self.conv_dim, self.conv_kernel - 1)
        # At least float32 (as the scan computes): a state rounded to bf16 would drift over long generations.
        ssm = torch.zeros(batch_size, self.num_heads, self.head_dim, self.cfg.ssm_state_size,
                          dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        return MambaCache(conv, ssm)

    def forward(self, hidden: Tensor, seq_idx: Tensor | None, cu_seqlens: Tensor,
                cache: MambaCache | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); with `cache`, prefill (see `mamba_mix`)."""
        return self.out_proj(mamba_mix(self, self.in_proj(hidden), seq_idx, cache))

    def step(self, hidden: Tensor, cache: MambaCache, position: int | Tensor) -> Tensor:
        """One token per row (B, D) -> (B, D); advances `cache` in place (the state is the position)."""
        b = hidden.shape[0]
        z, xbc, dt = torch.split(self.in_proj(hidden), [self.inner, self.conv_dim, self.num_heads], dim=-1)
        xbc, cache.conv = causal_conv1d_update_ref(xbc, cache.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                   activation="silu")  # (b, conv_dim)
        x, B, C = torch.split(xbc, [self.inner, self.groups_state, self.groups_state], dim=-1)
        y, cache.ssm = ssd_step_ref(
            cache.ssm, x.reshape(b, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, self.n_groups, -1), C.reshape(b, self.n_groups, -1),
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
        )  # (b, h, p)
        y = self.kernels.gated_norm(y.reshape(b, self.inner), z, self.norm.weight, self.norm_eps,
                                    group_size=self.inner // self.n_groups)
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

    def allocate_cache(self, batch_size: int, capacity: int) -> AttentionCache:
        keys = self.k_proj.weight.new_zeros(batch_size, capacity, self.kv_heads, self.head_dim)
        return AttentionCache(keys, torch.zeros_like(keys))

    def forward(self, hidden: Tensor, seq_idx: Tensor | None, cu_seqlens: Tensor,
                cache: AttentionCache | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D). With `cache` (prefill: one sample per row) the keys and values
        of the L tokens are kept in its first L positions."""
        b, l, _ = hidden.shape
        # THD layout: the batch is one flattened packed row, boundaries in cu_seqlens.
        q = self.q_proj(hidden).reshape(b * l, self.heads, self.head_dim)
        k = self.k_proj(hidden).reshape(b * l, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden).reshape(b * l, self.kv_heads, self.head_dim)
        if cache is not None:
            cache.keys[:, :l] = k.reshape(b, l, self.kv_heads, self.head_dim)
            cache.values[:, :l] = v.reshape(b, l, self.kv_heads, self.head_dim)
        out = self.kernels.attention(q, k, v, cu_seqlens, causal=True)  # (b*l, heads, head_dim)
        return self.o_proj(out.reshape(b, l, -1))

    def step(self, hidden: Tensor, cache: AttentionCache, position: int | Tensor) -> Tensor:
        """One token per row (B, D) at `position` (every row's, or (B,) each row's own in a ragged
        batch) -> (B, D); writes its keys and values into `cache`."""
        b = hidden.shape[0]
        q = self.q_proj(hidden).reshape(b, self.heads, self.head_dim)
        k = self.k_proj(hidden).reshape(b, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden).reshape(b, self.kv_heads, self.head_dim)
        if isinstance(position, int):
            cache.keys[:, position], cache.values[:, position] = k, v
            out = attention_with_kv_cache_ref(q, cache.keys[:, :position + 1], cache.values[:, :position + 1])
        else:  # row i attends to its first position[i] + 1 entries only
            rows = torch.arange(b, device=position.device)
            cache.keys[rows, position], cache.values[rows, position] = k, v
            end = int(position.max()) + 1
            out = attention_with_kv_cache_ref(q, cache.keys[:, :end], cache.values[:, :end], cache_seqlens=position + 1)
        return self.o_proj(out.reshape(b, -1))  # out: (b, heads, head_dim)


class SquaredReluMLP(nn.Module):
    # `kernels` is unused (plain matmuls); taken so that every mixer is built the same way.
    def __init__(self, cfg: LanguageModelConfig, kernels: Kernels):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.mlp_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden_size, cfg.hidden_size, bias=False)

    def allocate_cache(self, batch_size: int, capacity: int) -> None:
        return None  # position-wise: nothing to remember

    def forward(self, hidden: Tensor, seq_idx: Tensor | None, cu_seqlens: Tensor, cache: None = None) -> Tensor:
        return self.down_proj(squared_relu(self.up_proj(hidden)))

    def step(self, hidden: Tensor, cache: None, position: int | Tensor) -> Tensor:
        return self.forward(hidden, None, None)


MIXERS = {"M": Mamba2Mixer, "*": Attention, "-": SquaredReluMLP}


class HybridBlock(nn.Module):
    """Pre-norm residual block around one mixer."""

    def __init__(self, cfg: LanguageModelConfig, kind: str, kernels: Kernels):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernels.rms_norm)
        self.mixer = MIXERS[kind](cfg, kernels)

    def forward(self, hidden: Tensor, seq_idx: Tensor | None, cu_seqlens: Tensor, cache: LayerCache = None) -> Tensor:
        return hidden + self.mixer(self.norm(hidden), seq_idx, cu_seqlens, cache)

    def step(self, hidden: Tensor, cache: LayerCache, position: int | Tensor) -> Tensor:
        return hidden + self.mixer.step(self.norm(hidden), cache, position)


class Backbone(nn.Module):
    def __init__(self, cfg: LanguageModelConfig, kernels: Kernels, activation_checkpointing: bool = False):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(cfg, kind, kernels) for kind in cfg.pattern)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernels.rms_norm)
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_fn = recompute_in_backward

    def forward(self, embeds: Tensor, seq_idx: Tensor | None, cu_seqlens: Tensor,
                cache: InferenceCache | None = None) -> Tensor:
        """(B, L, D) -> final normalised hidden states (B, L, D); with `cache`, also fills it (prefill)."""
        hidden = embeds
        caches = cache.layers if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, caches):
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only the layer's input; backward reruns its forward (same kernels, same autocast).
                hidden = self.checkpoint_fn(layer, hidden, seq_idx, cu_seqlens, layer_cache)
            else:
                hidden = layer(hidden, seq_idx, cu_seqlens, layer_cache)
        if cache is not None:
            cache.length = embeds.shape[1]
        return self.norm_f(hidden)

    def step(self, embeds: Tensor, cache: InferenceCache) -> Tensor:
        """The next token's embeddings (B, D) -> its final normalised hidden state (B, D); advances `cache`."""
        if cache.length >= cache.capacity:
            raise ValueError(f"the cache is full ({cache.capacity} tokens): prefill with a larger capacity")
        hidden = embeds
        position = cache.length if cache.lengths is None else cache.lengths.to(embeds.device)
        for layer, layer_cache in zip(self.layers, cache.layers):
            hidden = layer.step(hidden, layer_cache, position)
        cache.length += 1
        if cache.lengths is not None:
            cache.lengths = position + 1
        return self.norm_f(hidden)


class HybridLanguageModel(nn.Module):
    """Backbone + untied output head. `forward` returns logits (B, L, V) for inference; training
    uses `backbone` and the chunked loss so full logits are never materialised."""

    # The whole stack in one piece: first and last pipeline stage at once (see McoreLanguageModel).
    pre_process = post_process = True

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

    # The language-model interface the vision-language model uses, shared with the megatron-core
    # engine (`train.engines.mcore.model.McoreLanguageModel`).
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.backbone.embeddings(input_ids)  # (B, L) -> (B, L, D)

    def hidden_states(self, embeds: Tensor, seq_idx: Tensor, cu_seqlens: Tensor) -> Tensor:
        """(B, L, D) input embeddings -> final normalised hidden states (B, L, D)."""
        return self.backbone(embeds, seq_idx, cu_seqlens)

    def local_tokens(self, tensor: Tensor) -> Tensor:
        return tensor  # every token of the batch is this rank's (no context parallelism here)

    @property
    def head_weight(self) -> Tensor:
        return self.lm_head.weight  # (V, D)

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        seq_idx, cu_seqlens = packing_metadata(input_ids.shape, cu_seqlens, input_ids.device)
        return self.lm_head(self.hidden_states(self.embed_tokens(input_ids), seq_idx, cu_seqlens))

    @torch.no_grad()
    def prefill(self, embeds: Tensor, capacity: int) -> tuple[Tensor, InferenceCache]:
        """Prompt embeddings (B, L, D), one prompt per row -> next-token logits (B, V) and the cache
        after the prompt. `capacity` (>= L) is the longest sequence, prompt included, it will hold."""
        b, l, _ = embeds.shape
        if capacity < l:
            raise ValueError(f"capacity {capacity} is shorter than the prompt ({l} tokens)")
        cache = InferenceCache([layer.mixer.allocate_cache(b, capacity) for layer in self.backbone.layers], 0, capacity)
        _, rows = packing_metadata((b, l), None, embeds.device)
        # seq_idx None: each row is one sample, and the Mamba state after its last token is wanted.
        hidden = self.backbone(embeds, None, rows, cache)
        return self.lm_head(hidden[:, -1]), cache

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: InferenceCache) -> Tensor:
        """Next token ids (B,) -> logits (B, V) for the token after them; advances `cache` by one."""
        return self.lm_head(self.backbone.step(self.backbone.embeddings(tokens), cache))


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
