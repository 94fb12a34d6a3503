"""Native (transformers Nemotron-H) weights <-> megatron-core's, whole and per tensor-parallel rank.

Names: the native model's follow transformers (`backbone.layers.N.mixer.in_proj.weight`, ...);
megatron's are those of `MambaModel` with our spec (`decoder.layers.N.mixer.in_proj.weight`, ...).
Mamba parameters keep their layout; attention's q/k/v become one `linear_qkv` laid out per KV group
[q heads of the group | k | v] (megatron's layout); the MLP's up/down become `linear_fc1/2`.

Tensor-parallel split of each megatron parameter (`tp_rule`):
- norms of the layers and the final norm: whole on every rank;
- Mamba `in_proj`: its output is [z | x | B | C | dt]; each part is split over the ranks and rank r
  holds [z_r | x_r | B_r | C_r | dt_r] (`conv1d` likewise over [x | B | C]);
- per-head / per-channel Mamba parameters (`dt_bias`, `A_log`, `D`, the gated norm): split;
- column-parallel (`linear_qkv`, `linear_fc1`, the output head, the embedding's vocabulary) along
  dim 0, row-parallel (`out_proj`, `linear_proj`, `linear_fc2`) along dim 1.
Every conversion is a permutation of whole tensors: round trips are bit-exact.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from train.config.schema import LanguageModelConfig

_MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight")


def _qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, lm: LanguageModelConfig) -> Tensor:
    groups, hd = lm.num_key_value_heads, lm.head_dim
    per_group = lm.num_attention_heads // groups
    d = q.shape[1]
    # (groups, [per_group q heads | k | v] * head_dim, D): megatron's layout of linear_qkv.
    return torch.cat([q.reshape(groups, per_group * hd, d), k.reshape(groups, hd, d), v.reshape(groups, hd, d)],
                     dim=1).reshape(-1, d)


def _qkv_from_megatron(w: Tensor, lm: LanguageModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    groups, hd = lm.num_key_value_heads, lm.head_dim
    per_group = lm.num_attention_heads // groups
    d = w.shape[1]
    q, k, v = torch.split(w.reshape(groups, (per_group + 2) * hd, d), [per_group * hd, hd, hd], dim=1)
    return q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)


_MIXER_PARAMS = {"M": [f"mixer.{p}" for p in _MAMBA_PARAMS],
                 "*": [f"mixer.{x}_proj.weight" for x in "qkvo"],
                 "-": ["mixer.up_proj.weight", "mixer.down_proj.weight"]}


def native_names(lm: LanguageModelConfig) -> list[str]:
    """Every parameter name of the native language model."""
    names = ["backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"]
    for i, kind in enumerate(lm.pattern):
        names += [f"backbone.layers.{i}.{p}" for p in ["norm.weight", *_MIXER_PARAMS[kind]]]
    return names


def _is_qkv(megatron: str) -> bool:
    return megatron.endswith("linear_qkv.weight")


def native_to_megatron(state: dict[str, Tensor], lm: LanguageModelConfig) -> dict[str, Tensor]:
    """Native language-model tensors -> megatron's (all of them, or a subset: e.g. the optimizer state
    of the parameters one rank's optimizer owns; q, k and v travel together)."""
    out = {}
    for name in native_names(lm):
        target = megatron_name(name, lm)
        if name in state and not _is_qkv(target):
            out[target] = state[name]
    for i in (i for i, kind in enumerate(lm.pattern) if kind == "*"):
        qkv = [f"backbone.layers.{i}.mixer.{x}_proj.weight" for x in "qkv"]
        if qkv[0] in state:
            out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = _qkv_to_megatron(*(state[n] for n in qkv), lm)
    return out


def megatron_to_native(state: dict[str, Tensor], lm: LanguageModelConfig) -> dict[str, Tensor]:
    """Megatron tensors (all, or a subset) -> native language-model tensors."""
    out = {}
    for name in native_names(lm):
        source = megatron_name(name, lm)
        if source in state and not _is_qkv(source):
            out[name] = state[source]
    for i in (i for i, kind in enumerate(lm.pattern) if kind == "*"):
        source = f"decoder.layers.{i}.self_attention.linear_qkv.weight"
        if source in state:
            q, k, v = _qkv_from_megatron(state[source], lm)
            out.update({f"backbone.layers.{i}.mixer.{x}_proj.weight": t for x, t in zip("qkv", (q, k, v))})
    return out


def megatron_name(native_name: str, lm: LanguageModelConfig) -> str:
    """The megatron parameter a native parameter lives in (q, k and v all live in `linear_qkv`)."""
    fixed = {"backbone.embeddings.weight": "embedding.word_embeddings.weight",
             "backbone.norm_f.weight": "decoder.final_norm.weight", "lm_head.weight": "output_layer.weight"}
    if native_name in fixed:
        return fixed[native_name]
    _, _, index, rest = native_name.split(".", 3)  # backbone.layers.N.<rest>
    m = f"decoder.layers.{index}."
    kind = lm.pattern[int(index)]
    if rest == "norm.weight":
        return m + {"M": "norm.weight", "*": "input_layernorm.weight", "-": "pre_mlp_layernorm.weight"}[kind]
    if kind == "M":
        return m + rest
    if kind == "*":
        return m + ("self_attention.linear_proj.weight" if rest == "mixer.o_proj.weight"
                    else "self_attention.linear_qkv.weight")
    return m + {"mixer.up_proj.weight": "mlp.linear_fc1.weight", "mixer.down_proj.weight": "mlp.linear_fc2.weight"}[rest]


Rule = tuple[Literal["whole"]] | tuple[Literal["split"], int] | tuple[Literal["parts"], list[int]]


def tp_rule(name: str, lm: LanguageModelConfig) -> Rule:
    """How megatron parameter `name` is laid out over the tensor-parallel ranks (module docstring)."""
    inner, groups_state = lm.mamba_intermediate_size, lm.n_groups * lm.ssm_state_size
    if name.endswith("mixer.in_proj.weight"):
        return ("parts", [inner, inner, groups_state, groups_state, lm.mamba_num_heads])
    if name.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
        return ("parts", [inner, groups_state, groups_state])
    if name.endswith(("mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight")):
        return ("split", 0)
    if name.endswith(("norm.weight", "layernorm.weight")):
        return ("whole",)
    if name.endswith(("mixer.out_proj.weight", "linear_proj.weight", "linear_fc2.weight")):
        return ("split", 1)
    if name.endswith(("linear_qkv.weight", "linear_fc1.weight", "output_layer.weight", "word_embeddings.weight")):
        return ("split", 0)
    raise KeyError(f"no tensor-parallel rule for megatron parameter {name}")


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
    if name.endswith("linear_qkv.weight"):  # rank r holds whole KV groups: a block of each of q, k, v
        local_lm = _with_heads(lm, lm.num_attention_heads // size, lm.num_key_value_heads // size)
        out = {}
        layer = name.split(".")[2]
        for x, t in zip("qkv", _qkv_from_megatron(local, local_lm)):
            out[f"backbone.layers.{layer}.mixer.{x}_proj.weight"] = ((t.shape[0] * size, t.shape[1]),
                                                                     [((rank * t.shape[0], 0), t)])
        return out
    native = _native_name_of(name, lm)
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
    if name.endswith("linear_qkv.weight"):
        layer = name.split(".")[2]
        q, k, v = (chunks[f"backbone.layers.{layer}.mixer.{x}_proj.weight"][0] for x in "qkv")
        return _qkv_to_megatron(q, k, v, _with_heads(lm, lm.num_attention_heads // size, lm.num_key_value_heads // size))
    (pieces,) = chunks.values()
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _native_name_of(name: str, lm: LanguageModelConfig) -> str:
    return _native_names_by_megatron(lm.pattern)[name]


@functools.lru_cache(maxsize=8)
def _native_names_by_megatron(pattern: str) -> dict[str, str]:
    lm = LanguageModelConfig(pattern=pattern)  # names depend on the pattern only
    return {megatron_name(n, lm): n for n in native_names(lm) if not _is_qkv(megatron_name(n, lm))}


def _with_heads(lm: LanguageModelConfig, heads: int, kv_heads: int) -> LanguageModelConfig:
    from dataclasses import replace

    return replace(lm, num_attention_heads=heads, num_key_value_heads=kv_heads)
