"""Checkpoint state of a model whose language model runs on megatron-core, in the native layout
(`train.checkpoint.layout`): native names and whole-tensor shapes, so a checkpoint written at TP=2
resumes at TP=1 (or on the native engine) and back, and every tool that reads native checkpoints
(HF export, `train.api`, stage hand-off) reads it.

Each pipeline stage writes and reads only its own layers (under their whole-model names).
Nothing is joined in memory: each rank writes its own chunks of the native tensors
(`weights.native_pieces`; a Mamba `in_proj` shard is five chunks, one per part) as a
`ShardedTensor` over its tensor-parallel group, and reads back the chunks of its layout, whatever
layout wrote them. Optimizer state (AdamW's moments) is laid out as its parameters and goes the
same way; the scalar step counts, equal for every parameter an optimizer updates, are carried over
by value.

With adapters (`peft`, `trainable_only`) the training state holds the trainable tensors only, as
`TrainableOnlyLayout` does on the native engine: the adapters under PEFT's native names and whole
shapes (`weights` maps them), whatever tensor-parallel layout wrote them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from train.checkpoint.layout import NativeLayout
from train.engines.mcore import weights
from train.engines.mcore.model import McoreLanguageModel

OURS = "language_model.model."  # megatron parameters inside the vision-language model
NATIVE = "language_model."


class McoreLayout:
    def __init__(self, language_model: McoreLanguageModel, trainable_only: bool = False):
        self.lm = language_model
        self.native = NativeLayout()
        # Adapters: the frozen base stays out of the training state (model-only reads stay whole).
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    # -- one {name: tensor} state: megatron shards <-> native chunks --------------------------------
    def _to_native(self, state: dict) -> dict:
        out = {k: v for k, v in state.items() if not k.startswith(OURS)}
        for key in _ours(state):  # sorted: making a ShardedTensor is a collective over the TP group
            name = self.lm.global_name(key[len(OURS):])
            pieces = weights.native_pieces(name, state[key], self.lm.cfg, self.lm.tp_rank, self.lm.tp_size)
            for native, (shape, chunks) in pieces.items():
                out[NATIVE + native] = self._native_tensor(shape, chunks)
        return out

    def _from_native(self, loaded: dict, local: dict) -> dict:
        """`loaded` (native names, as read) -> this rank's megatron tensors, shaped as `local`'s."""
        out = {k: v for k, v in loaded.items() if not k.startswith(NATIVE)}
        for key in _ours(local):
            name = self.lm.global_name(key[len(OURS):])
            pieces = weights.native_pieces(name, local[key], self.lm.cfg, self.lm.tp_rank, self.lm.tp_size)
            if not all(NATIVE + native in loaded for native in pieces):
                continue  # a part the checkpoint does not hold (see load_model_weights)
            chunks = {native: _local_chunks(loaded[NATIVE + native], *pieces[native]) for native in pieces}
            out[key] = weights.assemble_local(name, chunks, self.lm.cfg, self.lm.tp_size)
        return out

    def _native_tensor(self, shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], Tensor]]):
        if len(chunks) == 1 and tuple(chunks[0][1].shape) == tuple(shape):
            return chunks[0][1]  # whole on every rank (norms; everything at TP=1)
        rank = torch.distributed.get_rank()
        shards = [Shard(t.contiguous(), ShardMetadata(list(offset), list(t.shape), f"rank:{rank}/{t.device}"))
                  for offset, t in chunks]
        return init_from_local_shards(shards, list(shape), process_group=self.lm.tp_group)

    # -- weights ------------------------------------------------------------------------------------
    def model_state(self, model):
        return self._to_native(self.native.model_state(model))

    def load_model_state(self, model, state, strict=True):
        local = self.native.model_state(model)
        self.native.load_model_state(model, {**_extra_state_slots(model), **self._from_native(state, local)},
                                     strict=strict)

    # -- weights and optimizer ----------------------------------------------------------------------
    def state(self, model, optimizer):
        model_state, optim_state = get_state_dict(model, optimizer, options=self.options)
        states = optim_state["state"]
        native_states = {k: v for k, v in states.items() if not k.startswith(OURS)}
        for field, values in _fields(states).items():
            if all(v.ndim == 0 for v in values.values()):
                continue  # step counts: set below, one value for every parameter
            for native, tensor in self._to_native(values).items():
                native_states.setdefault(native, {})[field] = tensor
        steps = {f: v for f, v in _fields(states).items() if all(t.ndim == 0 for t in v.values())}
        for native in [k for k in native_states if k.startswith(NATIVE) and k not in states]:
            native_states[native].update({f: next(iter(v.values())).clone() for f, v in steps.items()})
        # Each native parameter joins the group of the megatron parameter it lives in.
        groups = []
        for group in optim_state["param_groups"]:
            mine = set(group["params"])
            params = [p for p in group["params"] if not p.startswith(OURS)]
            params += sorted(n for n in native_states if n.startswith(NATIVE) and n not in states
                             and home_of(n, self.lm) in mine)
            groups.append({**group, "params": params})
        return self._to_native(model_state), {"state": native_states, "param_groups": groups}

    def load_state(self, model, optimizer, model_state, optim_state):
        local_model, local_optim = get_state_dict(model, optimizer, options=self.options)  # names, shapes, groups
        states = {k: v for k, v in optim_state["state"].items() if not k.startswith(NATIVE) or k.startswith(OURS)}
        for field, values in _fields(local_optim["state"]).items():
            if all(v.ndim == 0 for v in values.values()):
                step = next(v[field] for k, v in optim_state["state"].items() if k.startswith(NATIVE))
                converted = {k: step.clone() for k in values}
            else:
                loaded = {k: v[field] for k, v in optim_state["state"].items() if k.startswith(NATIVE)}
                converted = self._from_native(loaded, values)
            for key, tensor in converted.items():
                states.setdefault(key, {})[field] = tensor
        set_state_dict(model, optimizer,
                       model_state_dict={**_extra_state_slots(model), **self._from_native(model_state, local_model)},
                       optim_state_dict={"state": states, "param_groups": local_optim["param_groups"]},
                       options=self.options)


def _ours(state: dict) -> list[str]:
    return sorted(k for k in state if k.startswith(OURS) and not k.endswith("_extra_state"))


def _fields(states: dict[str, dict]) -> dict[str, dict[str, Tensor]]:
    """{field: {megatron parameter: tensor}} of the language model's optimizer state."""
    out: dict[str, dict[str, Tensor]] = {}
    for key in _ours(states):
        for field, tensor in states[key].items():
            out.setdefault(field, {})[key] = tensor
    return out


def _local_chunks(value, whole_shape: tuple[int, ...], pieces: list) -> list[Tensor]:
    """This rank's chunks of a loaded native tensor: a ShardedTensor's local shards (what DCP filled),
    or the same chunks cut from a whole tensor (weights merged or converted in memory, the stage
    hand-off from an adapter run)."""
    if isinstance(value, ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    if tuple(value.shape) != tuple(whole_shape):
        return [value]
    return [value[tuple(slice(o, o + n) for o, n in zip(offset, chunk.shape))] for offset, chunk in pieces]


def _extra_state_slots(model: torch.nn.Module) -> dict:
    """megatron's linears keep an `_extra_state` slot (Transformer Engine's FP8 metadata; empty for
    the local spec): a strict load expects it."""
    return {k: v for k, v in model.state_dict().items() if k.endswith("._extra_state")}


def home_of(native_name: str, lm: McoreLanguageModel) -> str:
    """The name, inside the vision-language model, of the megatron parameter holding `native_name`
    (on this rank's pipeline stage)."""
    return OURS + str(lm.local_name(weights.megatron_name(native_name[len(NATIVE):], lm.cfg)))
