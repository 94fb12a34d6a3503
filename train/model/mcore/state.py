"""Checkpoint state of a model whose language model runs on megatron-core, in the native layout
(`train.checkpoint.layout`): the language model's tensor-parallel shards are joined into whole
tensors under native names when saving, and split again for this rank's layout when loading. So a
checkpoint written at TP=2 resumes at TP=1 (or on the native engine) and back, and every tool that
reads native checkpoints (HF export, `train.api`, stage hand-off) reads it.

Optimizer state (AdamW's moments) is laid out as its parameters and converted the same way; the
scalar step counts, equal for every parameter an optimizer updates, are carried over by value.
Saving joins the language model and its optimizer state on every tensor-parallel rank at once (the
memory of one whole copy, on the CPU side of the write).
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from train.checkpoint.layout import NativeLayout
from train.model.mcore import weights
from train.model.mcore.model import McoreLanguageModel

OURS = "language_model.model."  # megatron parameters inside the vision-language model
NATIVE = "language_model."


class McoreLayout:
    def __init__(self, language_model: McoreLanguageModel):
        self.lm = language_model
        self.native = NativeLayout()

    # -- weights --------------------------------------------------------------------------------
    def _to_native(self, state: dict) -> dict:
        local = {k[len(OURS):]: v for k, v in state.items() if k.startswith(OURS) and not k.endswith("_extra_state")}
        rest = {k: v for k, v in state.items() if not k.startswith(OURS)}
        if not local:
            return rest
        native = weights.megatron_to_native(self.lm.gather_local(local), self.lm.cfg)
        return {**rest, **{NATIVE + k: v for k, v in native.items()}}

    def _from_native(self, state: dict) -> dict:
        native = {k[len(NATIVE):]: v for k, v in state.items() if k.startswith(NATIVE)}
        rest = {k: v for k, v in state.items() if not k.startswith(NATIVE)}
        if not native:
            return rest
        cfg = self.lm.cfg
        local = weights.shard_state(weights.native_to_megatron(native, cfg), cfg, self.lm.tp_rank, self.lm.tp_size)
        return {**rest, **{OURS + k: v for k, v in local.items()}}

    def model_state(self, model):
        return self._to_native(self.native.model_state(model))

    def load_model_state(self, model, state, strict=True):
        self.native.load_model_state(model, {**_extra_state_slots(model), **self._from_native(state)}, strict=strict)

    # -- weights and optimizer --------------------------------------------------------------------
    def state(self, model, optimizer):
        model_state, optim_state = get_state_dict(model, optimizer)
        return self._to_native(model_state), self._optim_to_native(optim_state)

    def load_state(self, model, optimizer, model_state, optim_state):
        _, template = get_state_dict(model, optimizer)  # this rank's names and param groups
        per_param = self._optim_fields_from_native(optim_state["state"])
        set_state_dict(model, optimizer, model_state_dict={**_extra_state_slots(model), **self._from_native(model_state)},
                       optim_state_dict={"state": per_param, "param_groups": template["param_groups"]})

    def _optim_to_native(self, optim: dict) -> dict:
        states = _convert_states(optim["state"], OURS, self._to_native)
        # Each native parameter joins the group of the megatron parameter it lives in.
        native_names = sorted(k for k in states if k.startswith(NATIVE) and k not in optim["state"])
        groups = []
        for group in optim["param_groups"]:
            mine = set(group["params"])
            params = [p for p in group["params"] if not p.startswith(OURS)]
            params += [n for n in native_names if home_of(n, self.lm) in mine]
            groups.append({**group, "params": params})
        return {"state": states, "param_groups": groups}

    def _optim_fields_from_native(self, states: dict[str, dict]) -> dict[str, dict]:
        return _convert_states(states, NATIVE, self._from_native)


def _convert_states(states: dict[str, dict], prefix: str, convert) -> dict[str, dict]:
    """Per-parameter optimizer states, those under `prefix` converted field by field by `convert`
    ({name: tensor} -> {name: tensor}, e.g. shards joined under native names); scalar fields (step
    counts, equal for every parameter an optimizer updates) are carried over by value."""
    mine = sorted(k for k in states if k.startswith(prefix))  # the same order on every rank: collectives
    if not mine:
        return states
    out = {k: v for k, v in states.items() if k not in mine}
    per_field = {}
    for field in states[mine[0]]:
        values = {k: states[k][field] for k in mine}
        scalar = all(v.ndim == 0 for v in values.values())
        per_field[field] = next(iter(values.values())) if scalar else convert(values)
    names = next(v for v in per_field.values() if isinstance(v, dict))
    for name in names:
        out[name] = {f: (v[name] if isinstance(v, dict) else v.clone()) for f, v in per_field.items()}
    return out


def _extra_state_slots(model: torch.nn.Module) -> dict:
    """megatron's linears keep an `_extra_state` slot (Transformer Engine's FP8 metadata; empty for
    the local spec): a strict load expects it."""
    return {k: v for k, v in model.state_dict().items() if k.endswith("._extra_state")}


def home_of(native_name: str, lm: McoreLanguageModel) -> str:
    """The name, inside the vision-language model, of the megatron parameter holding `native_name`."""
    return OURS + weights.megatron_name(native_name[len(NATIVE):], lm.cfg)
