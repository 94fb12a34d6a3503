"""Cached greedy generation for the hybrid LM (and the VLM, through its prompt embeddings).

Prefill runs the prompt through every layer once and keeps what decoding needs: per Mamba layer
the last `conv_kernel - 1` inputs of the causal conv and the SSM state after the last token, per
attention layer the keys and values. A decode step then advances those states by one token with
the `_update` / `_step` / `_with_kv_cache` twins of the training ops, so a new token costs O(1) in
Mamba layers and O(t) in attention layers instead of a forward over the whole sequence.

Inference always computes with the torch reference ops, whatever `model.kernels` names: they
have step twins and run anywhere. The layers' parameters are used as they are (no renaming), so
any trained model generates. Everything here works on unpacked rows (one sample per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from train.model.language_model import Attention, HybridLanguageModel, Mamba2Mixer
from train.model.vlm import VisionLanguageModel
from train.ops import (
    attention_with_kv_cache_ref, causal_conv1d_ref, causal_conv1d_update_ref, gated_rms_norm_ref, rms_norm_ref,
    ssd_scan_ref, ssd_step_ref, varlen_attention_ref,
)

__all__ = ["AttentionState", "InferenceCache", "MambaState", "decode_step", "greedy_tokens", "prefill",
           "prompt_embeddings"]


@dataclass
class MambaState:
    conv: Tensor  # (B, conv_dim, conv_kernel - 1): the conv's last inputs (pre-activation xBC), oldest first
    ssm: Tensor  # (B, H, P, N) float32: a state rounded to bf16 would drift over long generations


@dataclass
class AttentionState:
    keys: Tensor  # (B, capacity, kv_heads, head_dim); positions >= InferenceCache.length are unused
    values: Tensor  # (B, capacity, kv_heads, head_dim)


@dataclass
class InferenceCache:
    states: list[MambaState | AttentionState | None]  # one per layer; None for MLP layers
    length: int  # tokens consumed so far
    capacity: int  # tokens the attention buffers hold


# --- Mamba2 --------------------------------------------------------------------------------------

def _mamba_in(mixer: Mamba2Mixer, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.split(mixer.in_proj(hidden), [mixer.inner, mixer.conv_dim, mixer.num_heads], dim=-1)


def _mamba_out(mixer: Mamba2Mixer, y: Tensor, z: Tensor) -> Tensor:
    y = gated_rms_norm_ref(y, z, mixer.norm.weight, mixer.cfg.norm_eps, group_size=mixer.inner // mixer.cfg.n_groups)
    return mixer.out_proj(y)


def mamba_prefill(mixer: Mamba2Mixer, hidden: Tensor) -> tuple[Tensor, MambaState]:
    """(B, L, D) -> output (B, L, D) and the state after token L-1 (Mamba2Mixer.forward, one sample per row)."""
    b, l, _ = hidden.shape
    cfg = mixer.cfg
    z, xbc, dt = _mamba_in(mixer, hidden)
    xbc = xbc.transpose(1, 2)  # (B, conv_dim, L)
    width = cfg.conv_kernel - 1
    # A prompt shorter than the window is left-padded with the zeros the training conv reads there.
    padded = F.pad(xbc, (max(0, width - l), 0))
    conv_state = padded[..., padded.shape[-1] - width:].contiguous()  # (B, conv_dim, K-1)
    xbc = causal_conv1d_ref(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                            activation="silu").transpose(1, 2)  # (B, L, conv_dim)
    x, B, C = torch.split(xbc, [mixer.inner, mixer.groups_state, mixer.groups_state], dim=-1)
    y, ssm = ssd_scan_ref(
        x.reshape(b, l, mixer.num_heads, mixer.head_dim), dt, -torch.exp(mixer.A_log.float()),
        B.reshape(b, l, cfg.n_groups, -1), C.reshape(b, l, cfg.n_groups, -1), cfg.chunk_size,
        D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True, dt_limit=mixer.dt_limit, return_final_states=True,
    )  # (B, L, H, P), (B, H, P, N)
    return _mamba_out(mixer, y.reshape(b, l, mixer.inner), z), MambaState(conv_state, ssm)


def mamba_step(mixer: Mamba2Mixer, hidden: Tensor, state: MambaState) -> Tensor:
    """One token (B, D) -> (B, D); advances `state` in place."""
    b = hidden.shape[0]
    cfg = mixer.cfg
    z, xbc, dt = _mamba_in(mixer, hidden)
    xbc, state.conv = causal_conv1d_update_ref(xbc, state.conv, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                                               activation="silu")  # (B, conv_dim)
    x, B, C = torch.split(xbc, [mixer.inner, mixer.groups_state, mixer.groups_state], dim=-1)
    y, state.ssm = ssd_step_ref(
        state.ssm, x.reshape(b, mixer.num_heads, mixer.head_dim), dt, -torch.exp(mixer.A_log.float()),
        B.reshape(b, cfg.n_groups, -1), C.reshape(b, cfg.n_groups, -1),
        D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True, dt_limit=mixer.dt_limit,
    )  # (B, H, P)
    return _mamba_out(mixer, y.reshape(b, mixer.inner), z)


# --- attention -----------------------------------------------------------------------------------

def attention_prefill(attn: Attention, hidden: Tensor, capacity: int) -> tuple[Tensor, AttentionState]:
    """(B, L, D) -> output (B, L, D) and K/V buffers of `capacity` positions holding the prompt's."""
    b, l, _ = hidden.shape
    q = attn.q_proj(hidden).reshape(b * l, attn.heads, attn.head_dim)
    k = attn.k_proj(hidden).reshape(b, l, attn.kv_heads, attn.head_dim)
    v = attn.v_proj(hidden).reshape(b, l, attn.kv_heads, attn.head_dim)
    rows = torch.arange(0, (b + 1) * l, l, dtype=torch.int32, device=hidden.device)
    out = varlen_attention_ref(q, k.flatten(0, 1), v.flatten(0, 1), rows, causal=True)  # (B*L, heads, head_dim)
    keys = k.new_zeros(b, capacity, attn.kv_heads, attn.head_dim)
    values = torch.zeros_like(keys)
    keys[:, :l], values[:, :l] = k, v
    return attn.o_proj(out.reshape(b, l, -1)), AttentionState(keys, values)


def attention_step(attn: Attention, hidden: Tensor, state: AttentionState, position: int) -> Tensor:
    """One token (B, D) at `position` -> (B, D); writes its K/V into the buffers."""
    b = hidden.shape[0]
    q = attn.q_proj(hidden).reshape(b, attn.heads, attn.head_dim)
    state.keys[:, position] = attn.k_proj(hidden).reshape(b, attn.kv_heads, attn.head_dim)
    state.values[:, position] = attn.v_proj(hidden).reshape(b, attn.kv_heads, attn.head_dim)
    out = attention_with_kv_cache_ref(q, state.keys[:, :position + 1], state.values[:, :position + 1])  # (B, heads, hd)
    return attn.o_proj(out.reshape(b, -1))


# --- whole model ---------------------------------------------------------------------------------

def _logits(lm: HybridLanguageModel, hidden: Tensor) -> Tensor:
    norm_f = lm.backbone.norm_f
    return lm.lm_head(rms_norm_ref(hidden, norm_f.weight, norm_f.eps))


@torch.no_grad()
def prefill(lm: HybridLanguageModel, embeds: Tensor, capacity: int) -> tuple[Tensor, InferenceCache]:
    """Prompt embeddings (B, L, D) -> next-token logits (B, V) and the cache after the prompt.

    `capacity` (>= L) is the longest sequence, prompt included, the cache will hold.
    """
    b, l, _ = embeds.shape
    if capacity < l:
        raise ValueError(f"capacity {capacity} is shorter than the prompt ({l} tokens)")
    hidden, states = embeds, []
    for layer in lm.backbone.layers:
        normed = rms_norm_ref(hidden, layer.norm.weight, layer.norm.eps)
        if layer.kind == "M":
            out, state = mamba_prefill(layer.mixer, normed)
        elif layer.kind == "*":
            out, state = attention_prefill(layer.mixer, normed, capacity)
        else:  # MLP: position-wise, nothing to remember
            out, state = layer.mixer(normed, None, None), None
        hidden = hidden + out
        states.append(state)
    return _logits(lm, hidden[:, -1]), InferenceCache(states, l, capacity)


@torch.no_grad()
def decode_step(lm: HybridLanguageModel, tokens: Tensor, cache: InferenceCache) -> Tensor:
    """Next token ids (B,) -> logits (B, V) for the token after them; advances `cache` by one."""
    if cache.length >= cache.capacity:
        raise ValueError(f"the cache is full ({cache.capacity} tokens): prefill with a larger capacity")
    hidden = lm.backbone.embeddings(tokens)  # (B, D)
    for layer, state in zip(lm.backbone.layers, cache.states):
        normed = rms_norm_ref(hidden, layer.norm.weight, layer.norm.eps)
        if layer.kind == "M":
            out = mamba_step(layer.mixer, normed, state)
        elif layer.kind == "*":
            out = attention_step(layer.mixer, normed, state, cache.length)
        else:
            out = layer.mixer(normed, None, None)
        hidden = hidden + out
    cache.length += 1
    return _logits(lm, hidden)


def greedy_tokens(lm: HybridLanguageModel, embeds: Tensor, max_new_tokens: int,
                  stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yields the greedy continuation of one prompt (embeds (1, L, D)) token by token, as soon as
    each is chosen; ends after `max_new_tokens` or at a stop token (which is not yielded)."""
    if embeds.shape[0] != 1:
        raise ValueError(f"greedy_tokens generates for one prompt, got a batch of {embeds.shape[0]}")
    stop = set(stop_ids)
    if max_new_tokens <= 0:
        return
    # The last chosen token is never fed back, so the cache needs L + max_new_tokens - 1 positions.
    logits, cache = prefill(lm, embeds, embeds.shape[1] + max_new_tokens - 1)
    for i in range(max_new_tokens):
        token = logits.argmax(dim=-1)  # (1,)
        if int(token) in stop:
            return
        yield int(token)
        if i + 1 < max_new_tokens:
            logits = decode_step(lm, token, cache)


@torch.no_grad()
def prompt_embeddings(model: VisionLanguageModel, input_ids: Tensor, tiles: Tensor) -> Tensor:
    """Token embeddings (B, L, D) with the media embeddings spliced at the media-token positions, as
    `VisionLanguageModel.hidden_states` feeds the backbone; tiles (N, 3, T, T) uint8."""
    embeds = model.language_model.backbone.embeddings(input_ids)
    media_positions = input_ids == model.image_token_id
    num_slots = int(media_positions.sum())
    if tiles.shape[0] or num_slots:
        media = model.embed_media(tiles).to(embeds.dtype)  # (N * tokens_per_tile, D)
        if media.shape[0] != num_slots:
            raise ValueError(f"{num_slots} media tokens in the prompt but the tiles give {media.shape[0]} embeddings")
        embeds = embeds.masked_scatter(media_positions.unsqueeze(-1), media)
    return embeds
