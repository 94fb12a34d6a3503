"""LoRA adapters on megatron-core's tensor-parallel linears (`peft=lora` with `model.impl=mcore`),
hand-written: PEFT's LoRA layers wrap `nn.Linear`, and megatron's ColumnParallelLinear /
RowParallelLinear hold one rank's shard and return `(output, bias)`, so they cannot take them.

Each adapter is split as its base linear is split (`train.hf.mapping.lora_factor_split`):

- column-parallel base (linear_qkv, linear_fc1, Mamba's in_proj; output rows split): A [r, in] is
  whole on every rank, B [out / tp, r] holds the rank's rows, in the base's own row layout (in_proj's
  B is split part by part, [z_r | x_r | B_r | C_r | dt_r], as its weight is). The input reaches A
  whole (or, under sequence parallelism, as this rank's slice of the sequence, whose (T / tp, r)
  product is gathered: r wide instead of the hidden width);
- row-parallel base (linear_proj, linear_fc2, out_proj; input columns split): A [r, in / tp] takes
  the rank's input features, the partial (T, r) products are summed over the ranks (reduce-scattered
  along the sequence under sequence parallelism), B [out, r] is whole.

megatron's autograd collectives (`copy_to_tensor_model_parallel_region` and friends) give each factor
its whole gradient; the factors whose gradient is partial per rank under sequence parallelism (each
rank saw a slice of the sequence) carry the `sequence_parallel` tag the trainer sums over the
tensor-parallel group (`train.parallel.distributed.finalize_tensor_parallel_grads`), and split ones the
`tensor_model_parallel` tag gradient clipping counts once.

The fused linear_qkv gets three adapters, one per native projection (q, k, v), so they are the
native engine's adapters: their products are interleaved into megatron's per-KV-group layout
[q heads of the group | k | v]. Parameters are named `<linear>.lora_A.<q|k|v|all>`
(`train.engines.mcore.weights` maps them to PEFT's native names), initialised whole from the native
engine's per-module draw (`initial_lora_a`) and then split: every layout starts from the adapters the
native engine starts from, and checkpoints hold PEFT's tensors, which `train.convert --adapters /
--merge` and the stage hand-off read as they read a native run's.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import Tensor, nn

from train.config.schema import ADAPTER_ROLES, PeftConfig
from train.engines.mcore import weights
from train.engines.mcore.model import McoreLanguageModel
from train.engines.native.adapters import fingerprint_entry, fingerprint_of, initial_lora_a
from train.hf.mapping import language_model_tensors

NATIVE_PREFIX = "language_model."


class ParallelLora(nn.Module):
    """The adapters of one megatron linear (one per branch: q, k, v of linear_qkv, else `all`), added
    to its output by a forward hook, so the base module and its parameter names stay megatron's."""

    def __init__(self, base: nn.Module, parallel_kind: str, branches: dict[str, dict[str, Tensor]],
                 scale: float, lm: McoreLanguageModel, qkv_groups: int | None):
        """`branches`: {branch: {"A": this rank's A, "B": its B}} (DoRA: + "magnitude_vector", set here
        from the base weight); `qkv_groups`: the KV groups this rank holds of a fused linear_qkv."""
        super().__init__()
        self.parallel_kind, self.scale, self.qkv_groups = parallel_kind, scale, qkv_groups
        self.tp_group, self.sequence_parallel = lm.tp_group, lm.sequence_parallel
        self.local_heads = weights.local_heads(lm.cfg, lm.tp_size)
        self.branches = list(branches)
        factors = list(next(iter(branches.values())))
        self.dora = "magnitude_vector" in factors
        column = parallel_kind == "column"
        for factor in factors:
            # On the base linear, so the names read `<linear>.lora_A.<branch>` (weights' adapter names).
            params = nn.ParameterDict({b: nn.Parameter(t[factor]) for b, t in branches.items()})
            setattr(base, f"lora_{factor}", params)
            for param in params.values():
                # A column base splits B (and DoRA's magnitude) along its rows, a row base A along its
                # input; the whole factor's gradient is partial per rank under sequence parallelism (A
                # of a column base sees the rank's tokens, B of a row base the reduce-scattered slice).
                if (factor == "A") != column:
                    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0 if column else 1, stride=1)
                else:
                    setattr(param, "sequence_parallel", self.sequence_parallel)
        self.base = [base]  # not a submodule: the adapters' parameters live on the base
        if self.dora:  # PEFT's start: the magnitude is the base's row norm (B is zero)
            with torch.no_grad():
                for b, norm in zip(self.branches, self.weight_norms(base)):
                    base.lora_magnitude_vector[b].copy_(norm)
        base.register_forward_hook(self._add_update)

    def _add_update(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        (x,) = args[:1]  # (T or T / tp under SP, B, in or in / tp): what the base linear received
        out, bias = output  # (T or T / tp, B, out / tp or out): no bias in this model
        lora = self.column_lora(module, x) if self.parallel_kind == "column" else self.row_lora(module, x)
        if not self.dora:
            return out + (lora * self.scale).to(out.dtype), bias
        # DoRA as PEFT computes it: the magnitude over the (detached) row norm of W + scale B A.
        magnitude = self.in_base_layout([module.lora_magnitude_vector[b] for b in self.branches])
        norm_scale = magnitude / self.in_base_layout(self.weight_norms(module)).detach()
        update = (norm_scale - 1) * out + norm_scale * lora * self.scale
        return out + update.to(out.dtype), bias

    def in_base_layout(self, parts: list[Tensor]) -> Tensor:
        """Per-branch tensors (..., out_b) -> the base's output layout (..., out / tp): the one part,
        or q, k, v interleaved per KV group as megatron lays out linear_qkv [q heads | k | v]."""
        if self.qkv_groups is None:
            (part,) = parts
            return part
        return torch.cat([p.reshape(*p.shape[:-1], self.qkv_groups, -1) for p in parts], dim=-1).flatten(-2)

    def column_lora(self, base: nn.Module, x: Tensor) -> Tensor:
        a = torch.cat([base.lora_A[b] for b in self.branches])  # (branches * r, in): one matmul for q, k, v
        h = x @ a.t().to(x.dtype)  # (T_local, B, branches * r)
        if self.sequence_parallel:  # every rank's tokens: (T, B, branches * r)
            h = tensor_parallel.gather_from_sequence_parallel_region(h, group=self.tp_group)
        else:  # whole on every rank; its gradient summed over the ranks' B shards
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return self.in_base_layout([hb @ base.lora_B[b].t().to(hb.dtype)
                                    for b, hb in zip(self.branches, h.chunk(len(self.branches), -1))])

    def row_lora(self, base: nn.Module, x: Tensor) -> Tensor:
        (b,) = self.branches
        h = x @ base.lora_A[b].t().to(x.dtype)  # (T, B, r): this rank's input features' share
        if self.sequence_parallel:  # summed over the ranks, each keeping its slice of the sequence
            h = tensor_parallel.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return h @ base.lora_B[b].t().to(h.dtype)  # (T or T / tp, B, out)

    @torch.no_grad()
    def weight_norms(self, base: nn.Module) -> list[Tensor]:
        """Per branch, this rank's share of DoRA's row norms of W + scale B A (PEFT's
        `get_weight_norm`): a column base holds whole rows; a row base sums its columns' squares
        over the ranks."""
        w = base.weight.float()
        if self.parallel_kind == "row":
            (b,) = self.branches
            squares = (w + self.scale * (base.lora_B[b] @ base.lora_A[b]).float()).square().sum(dim=1)
            torch.distributed.all_reduce(squares, group=self.tp_group)
            return [squares.sqrt()]
        rows = weights.qkv_from_megatron(w, self.local_heads) if self.qkv_groups else {"all": w}
        return [torch.linalg.norm(rows[b] + self.scale * (base.lora_B[b] @ base.lora_A[b]).float(), dim=1)
                for b in self.branches]


def targeted_linears(lm: McoreLanguageModel, targets: list[str]) -> dict[str, list]:
    """{megatron module name (this stage's): the mapping rows of the native linears it holds that a
    role of `targets` names} — q, k and v for linear_qkv, one row elsewhere."""
    suffixes = {s for role in targets for s in ADAPTER_ROLES[role]}
    rows_of = weights.megatron_rows(lm.cfg)
    out = {}
    for name, module in lm.model.named_modules():
        if "weight" not in module._parameters:
            continue
        rows = rows_of.get(lm.global_name(f"{name}.weight"), [])
        chosen = [r for r in rows if r.name.removesuffix(".weight").rsplit(".", 1)[-1] in suffixes]
        if chosen:
            out[name] = chosen
    return out


@torch.no_grad()
def apply_lm_adapters(lm: McoreLanguageModel, cfg: PeftConfig, seed: int) -> list[str]:
    """LoRA on the targeted linears of this rank's megatron language model; returns the native names
    of the adapted linears (`language_model.backbone.layers.N.mixer.q_proj`, ...), as the native
    engine's `apply_adapters` does."""
    adapted = []
    dtype = next(lm.model.parameters()).dtype
    for name, rows in targeted_linears(lm, cfg.targets).items():
        base = lm.model.get_submodule(name)
        megatron = lm.global_name(f"{name}.weight")
        kind = "row" if weights.tp_rule(megatron, lm.cfg) == ("split", 1) else "column"
        branches = {}
        for row in rows:
            native = NATIVE_PREFIX + row.name.removesuffix(".weight")
            out_features, in_features = native_shape(row, lm)
            param = f"{megatron.removesuffix('.weight')}.lora_%s.{weights.adapter_branch(row)}"
            whole = {"A": initial_lora_a(native, cfg.rank, in_features, cfg.init, seed),
                     "B": torch.zeros(out_features, cfg.rank)}
            if cfg.method == "dora":  # set from the base weight by ParallelLora
                whole["magnitude_vector"] = torch.zeros(out_features)
            branches[weights.adapter_branch(row)] = {
                factor: weights.shard(full, weights.tp_rule(param % factor, lm.cfg), lm.tp_rank, lm.tp_size)
                .to(device=base.weight.device, dtype=dtype) for factor, full in whole.items()}
            adapted.append(native)
        if rows[0].qkv:
            assert [r.qkv for r in rows] == ["q", "k", "v"], rows
        qkv_groups = lm.cfg.num_key_value_heads // lm.tp_size if rows[0].qkv else None
        ParallelLora(base, kind, branches, cfg.alpha / cfg.rank, lm, qkv_groups)
    if lm.pp_size > 1:  # every stage's: the checkpoint marker lists the whole model's
        stages: list[list[str]] = [[] for _ in range(lm.pp_size)]
        torch.distributed.all_gather_object(stages, adapted, group=lm.pp_group)
        adapted = [name for stage in stages for name in stage]
    order = {NATIVE_PREFIX + t.name.removesuffix(".weight"): i
             for i, t in enumerate(language_model_tensors(lm.cfg.pattern))}
    return sorted(adapted, key=order.__getitem__)  # the native model's order, as its list is


def native_shape(row, lm: McoreLanguageModel) -> tuple[int, int]:
    """(out, in) of the native linear `row` names, from this rank's megatron weight and its layout."""
    megatron = lm.local_name(row.megatron)
    local = lm.model.get_parameter(megatron).shape
    c = lm.cfg
    if row.qkv:
        heads = c.num_attention_heads if row.qkv == "q" else c.num_key_value_heads
        return heads * c.head_dim, local[1]
    rule = weights.tp_rule(row.megatron, c)
    if rule == ("split", 1):
        return local[0], local[1] * lm.tp_size
    return local[0] * lm.tp_size, local[1]


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """The native engine's `base_fingerprint` of this model's native-layout weights: each megatron
    tensor joined over the tensor-parallel ranks in turn (a collective: every rank, same order), taken
    and let go; the vision tower and projector are native modules already. Pipeline stages each take
    their layers' entries and exchange them (a few KB per tensor), so every rank has the whole
    model's fingerprint."""
    lm: McoreLanguageModel = model.language_model
    entries = {name: fingerprint_entry(name, t) for name, t in model.state_dict().items()
               if not name.startswith(NATIVE_PREFIX) and ".lora_" not in name}
    for name, param in sorted(lm.model.named_parameters()):
        if ".lora_" in name:
            continue
        whole = lm.gather_local({name: param})
        for native, tensor in weights.megatron_to_native(whole, lm.cfg).items():
            entries[NATIVE_PREFIX + native] = fingerprint_entry(NATIVE_PREFIX + native, tensor)
    if lm.pp_size > 1:
        stages: list[dict] = [{} for _ in range(lm.pp_size)]
        torch.distributed.all_gather_object(stages, entries, group=lm.pp_group)
        entries = {name: entry for stage in stages for name, entry in stage.items()}
    return fingerprint_of(entries)


# The language model's linears in megatron's layers (the embedding and the vocabulary-parallel head
# stay: the loss reads the head's weight directly).
PARALLEL_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


@torch.no_grad()
def cast_frozen_parallel_linears(lm: McoreLanguageModel, dtype: torch.dtype) -> None:
    """`peft.base_dtype=compute`: the frozen weights of megatron's linears to `dtype`, as the native
    engine's `cast_frozen_linears` does (no fp32 copy of what never trains); their adapters keep theirs
    (each product runs in the input's dtype)."""
    for name, module in lm.model.named_modules():
        weight = module._parameters.get("weight")
        if name.rsplit(".", 1)[-1] in PARALLEL_LINEARS and weight is not None and not weight.requires_grad:
            weight.data = weight.data.to(dtype)
