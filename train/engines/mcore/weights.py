"""Native (transformers Nemotron-H) weights <-> megatron-core's, whole and per tensor-parallel rank.

Which megatron parameter each native tensor lives in and how that parameter is split over the
tensor-parallel ranks is data: the rows of `train.hf.mapping.LANGUAGE_MODEL` (the table the HF
converter reads too). This module carries it out: renames, q/k/v fused into `linear_qkv` per KV group
[q heads of the group | k | v] (megatron's layout), and the splits (`tp_rule`: whole, along a dim, or
a run of parts each split, as Mamba's in_proj [z | x | B | C | dt]). Every conversion is a
permutation of whole tensors: round trips are bit-exact.

LoRA adapters (`train.engines.mcore.adapters`) are named after the linear they adapt:
`<megatron linear>.lora_A.<branch>` (branch `q` / `k` / `v` on the fused linear_qkv, one adapter per
native projection; `all` elsewhere) is PEFT's `<native linear>.lora_A.default.weight`, laid out over
the ranks by `train.hf.mapping.lora_factor_split` of the linear's own layout.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from train.config.schema import LanguageModelConfig
from train.hf.mapping import LMTensor, language_model_tensors, lora_factor_split, part_sizes

PEFT_ADAPTER = "default"  # PEFT's adapter name in native tensor names (`train.engines.native.adapters`)
# LoRA's A and B, DoRA's magnitude_vector.
_MEGATRON_ADAPTER = re.compile(r"(?P<linear>.+)\.lora_(?P<factor>A|B|magnitude_vector)\.(?P<branch>all|q|k|v)")
_NATIVE_ADAPTER = re.compile(rf"(?P<linear>.+)\.lora_(?P<factor>A|B|magnitude_vector)\.{PEFT_ADAPTER}\.weight")


def adapter_branch(row: LMTensor) -> str:
    """The key of a native linear's adapter inside its megatron linear: q / k / v of linear_qkv, else all."""
    return row.qkv or "all"


def megatron_rows(lm: LanguageModelConfig) -> dict[str, list[LMTensor]]:
    """{megatron parameter: the mapping rows of the native tensors it holds (q, k, v for linear_qkv)}."""
    return _by_megatron(lm.pattern)


def adapter_native_name(name: str, lm: LanguageModelConfig) -> str | None:
    """A megatron adapter parameter (`<linear>.lora_A.<branch>`) -> PEFT's native name; None otherwise."""
    match = _MEGATRON_ADAPTER.fullmatch(name)
    if match is None:
        return None
    (row,) = [r for r in _by_megatron(lm.pattern)[match["linear"] + ".weight"] if adapter_branch(r) == match["branch"]]
    return f"{row.name.removesuffix('.weight')}.lora_{match['factor']}.{PEFT_ADAPTER}.weight"


def adapter_megatron_name(native_name: str, lm: LanguageModelConfig) -> str | None:
    """PEFT's native adapter name -> the megatron adapter parameter; None for other tensors."""
    match = _NATIVE_ADAPTER.fullmatch(native_name)
    if match is None:
        return None
    row = _by_native(lm.pattern)[match["linear"] + ".weight"]
    return f"{row.megatron.removesuffix('.weight')}.lora_{match['factor']}.{adapter_branch(row)}"


def _qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, lm: LanguageModelConfig) -> Tensor:
    groups, hd = lm.num_key_value_heads, lm.head_dim
    per_group = lm.num_attention_heads // groups
    d = q.shape[1]
    # (groups, [per_group q heads | k | v] * head_dim, D): megatron's layout of linear_qkv.
    return torch.cat([q.reshape(groups, per_group * hd, d), k.reshape(groups, hd, d), v.reshape(groups, hd, d)],
                     dim=1).reshape(-1, d)


def qkv_from_megatron(w: Tensor, lm: LanguageModelConfig) -> dict[str, Tensor]:
    """A linear_qkv weight (rows of `lm`'s KV groups: [q heads | k | v] each) split into its q, k, v rows."""
    groups, hd = lm.num_key_value_heads, lm.head_dim
    per_group = lm.num_attention_heads // groups
    d = w.shape[1]
    q, k, v = torch.split(w.reshape(groups, (per_group + 2) * hd, d), [per_group * hd, hd, hd], dim=1)
    return {"q": q.reshape(-1, d), "k": k.reshape(-1, d), "v": v.reshape(-1, d)}


def native_names(lm: LanguageModelConfig) -> list[str]:
    """Every parameter name of the native language model."""
    return [t.name for t in language_model_tensors(lm.pattern)]


def native_to_megatron(state: dict[str, Tensor], lm: LanguageModelConfig) -> dict[str, Tensor]:
    """Native language-model tensors -> megatron's (all of them, or a subset: e.g. the optimizer state
    of the parameters one rank's optimizer owns; q, k and v travel together)."""
    out, fused = {}, {}
    for t in language_model_tensors(lm.pattern):
        if t.name in state:
            if t.qkv:
                fused.setdefault(t.megatron, {})[t.qkv] = state[t.name]
            else:
                out[t.megatron] = state[t.name]
    for name, qkv in fused.items():
        out[name] = _qkv_to_megatron(qkv["q"], qkv["k"], qkv["v"], lm)
    return out


def megatron_to_native(state: dict[str, Tensor], lm: LanguageModelConfig) -> dict[str, Tensor]:
    """Megatron tensors (all, or a subset) -> native language-model tensors."""
    tensors = [t for t in language_model_tensors(lm.pattern) if t.megatron in state]
    out = {t.name: state[t.megatron] for t in tensors if not t.qkv}
    unfused: dict[str, dict[str, Tensor]] = {}
    for t in (t for t in tensors if t.qkv):
        if t.megatron not in unfused:
            unfused[t.megatron] = qkv_from_megatron(state[t.megatron], lm)
        out[t.name] = unfused[t.megatron][t.qkv]
    return out


def megatron_name(native_name: str, lm: LanguageModelConfig) -> str:
    """The megatron parameter a native parameter lives in (q, k and v all live in `linear_qkv`)."""
    adapter = adapter_megatron_name(native_name, lm)
    if adapter is not None:
        return adapter
    return _by_native(lm.pattern)[native_name].megatron


Rule = tuple[Literal["whole"]] | tuple[Literal["split"], int] | tuple[Literal["parts"], list[int]]


def tp_rule(name: str, lm: LanguageModelConfig) -> Rule:
    """How megatron parameter `name` is laid out over the tensor-parallel ranks (the table's split,
    with a Mamba layer's part sizes; an adapter factor's from its linear's)."""
    adapter = _MEGATRON_ADAPTER.fullmatch(name)
    if adapter is not None:
        return lora_factor_split(tp_rule(adapter["linear"] + ".weight", lm), adapter["factor"])
    holders = _by_megatron(lm.pattern).get(name)
    if not holders:
        raise KeyError(f"no tensor-parallel rule for megatron parameter {name}")
    split = holders[0].split
    if split[0] == "parts":
        sizes = part_sizes(lm)
        return ("parts", [sizes[part] for part in split[1]])
    return split


def shard(full: Tensor, rule: Rule, rank: int, size: int) -> Tensor:
    """Rank `rank`'s part of a whole parameter."""
    if rule[0] == "whole":
        return full.clone()
    if rule[0] == "split":
        return full.chunk(size, dim=rule[1])[rank].clone()
    return torch.cat([part.chunk(size)[rank] for part in torch.split(full, rule[1])]).clone()


def unshard(shards: list[Tensor], rule: Rule) -> Tensor:
    """The whole parameter from every rank's part, in rank order."""
    if rule[0] == "whole":
        return shards[0].clone()
    if rule[0] == "split":
        return torch.cat(shards, dim=rule[1])
    size = len(shards)
    per_rank = [torch.split(s, [n // size for n in rule[1]]) for s in shards]  # [rank][part]
    return torch.cat([per_rank[r][p] for p in range(len(rule[1])) for r in range(size)])


def shard_state(full: dict[str, Tensor], lm: LanguageModelConfig, rank: int, size: int) -> dict[str, Tensor]:
    return {name: shard(t, tp_rule(name, lm), rank, size) for name, t in full.items()}


def unshard_state(shards: list[dict[str, Tensor]], lm: LanguageModelConfig) -> dict[str, Tensor]:
    return {name: unshard([s[name] for s in shards], tp_rule(name, lm)) for name in shards[0]}


def local_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """A megatron model's parameters on this rank (its state dict also holds empty `_extra_state`
    slots of the linears, kept for Transformer Engine)."""
    return {name: p.detach() for name, p in module.named_parameters()}


def load_local_state(module: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Load this rank's parameters (strict: every parameter, nothing else)."""
    expected = set(local_state(module))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"megatron weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    extra = {k: None for k in module.state_dict() if k.endswith("._extra_state")}
    module.load_state_dict({**extra, **state}, strict=True)


Piece = tuple[tuple[int, ...], Tensor]  # (offset in the whole native tensor, this rank's chunk)


def native_pieces(name: str, local: Tensor, lm: LanguageModelConfig, rank: int, size: int
                  ) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
    """This rank's megatron tensor `name` as chunks of native tensors: {native name: (whole shape,
    [(offset, chunk), ...])}. What a checkpoint writes per rank, so nothing is joined in memory;
    `assemble_local` is the inverse."""
    rule = tp_rule(name, lm)
    adapter = adapter_native_name(name, lm)
    if adapter is not None:
        return _pieces(adapter, rule, local, rank, size)
    holders = _by_megatron(lm.pattern)[name]
    if holders[0].qkv:  # rank r holds whole KV groups: a block of each of q, k, v
        local = qkv_from_megatron(local, local_heads(lm, size))
        return {h.name: ((local[h.qkv].shape[0] * size, local[h.qkv].shape[1]),
                         [((rank * local[h.qkv].shape[0], 0), local[h.qkv])]) for h in holders}
    (native,) = (h.name for h in holders)
    return _pieces(native, rule, local, rank, size)


def _pieces(native: str, rule: Rule, local: Tensor, rank: int, size: int
            ) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
    """A tensor split by `rule` (not a fused q/k/v): rank `rank`'s chunks of the native tensor."""
    if rule[0] == "whole":
        return {native: (tuple(local.shape), [((0,) * local.ndim, local)])}
    if rule[0] == "split":
        dim = rule[1]
        shape = list(local.shape)
        shape[dim] *= size
        offset = [0] * local.ndim
        offset[dim] = rank * local.shape[dim]
        return {native: (tuple(shape), [(tuple(offset), local)])}
    # parts along dim 0: each part's block r.
    pieces, start, local_start = [], 0, 0
    for part in rule[1]:
        rows = part // size
        pieces.append(((start + rank * rows, *([0] * (local.ndim - 1))), local[local_start:local_start + rows]))
        start += part
        local_start += rows
    return {native: ((start, *local.shape[1:]), pieces)}


def assemble_local(name: str, chunks: dict[str, list[Tensor]], lm: LanguageModelConfig, size: int) -> Tensor:
    """This rank's megatron tensor `name` from its native chunks, in `native_pieces` order."""
    holders = _by_megatron(lm.pattern).get(name)  # None: an adapter factor, one native tensor
    if holders and holders[0].qkv:
        qkv = {h.qkv: chunks[h.name][0] for h in holders}
        return _qkv_to_megatron(qkv["q"], qkv["k"], qkv["v"], local_heads(lm, size))
    (pieces,) = chunks.values()
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


@functools.lru_cache(maxsize=8)
def _by_native(pattern: str) -> dict[str, LMTensor]:
    return {t.name: t for t in language_model_tensors(pattern)}


@functools.lru_cache(maxsize=8)
def _by_megatron(pattern: str) -> dict[str, list[LMTensor]]:
    """{megatron parameter: the native tensors it holds (q, k, v for linear_qkv; else one)}."""
    out: dict[str, list[LMTensor]] = {}
    for t in language_model_tensors(pattern):
        out.setdefault(t.megatron, []).append(t)
    return out


def local_heads(lm: LanguageModelConfig, size: int) -> LanguageModelConfig:
    """The attention heads one of `size` tensor-parallel ranks holds: whole KV groups."""
    return replace(lm, num_attention_heads=lm.num_attention_heads // size,
                   num_key_value_heads=lm.num_key_value_heads // size)
