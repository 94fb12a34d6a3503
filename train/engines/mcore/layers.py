"""Our modules for megatron-core's hybrid stack: the Mamba mixer, the core attention over packed
rows, and an RMSNorm that takes part in sequence parallelism.

Each is built by megatron's `build_module` from the spec (`train.engines.mcore.spec`) with the
constructor arguments megatron passes, and computes through the same op backends as the native
model (`train.ops.dispatch.Kernels`), so both engines compute one function.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor, nn

from train.config.schema import LanguageModelConfig
from train.model.language_model import mamba_dt_limit, mamba_mix, mamba_scan
from train.ops.dispatch import Kernels


class RMSNorm(nn.Module):
    """RMSNorm with megatron's norm constructor. Under sequence parallelism each tensor-parallel rank
    normalises its slice of the sequence, so its weight's gradient is partial: the `sequence_parallel`
    tag makes megatron's gradient finalisation all-reduce it over the tensor-parallel group."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float | None = None, kernels: Kernels = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
        # megatron's MambaLayer builds its norm without `eps`: take the model's.
        self.eps = config.layernorm_epsilon if eps is None else eps
        self.norm_fn = kernels.rms_norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_fn(x, self.weight, self.eps)


def packed_seq_idx(packed_seq_params: PackedSeqParams | None, length: int, device: torch.device) -> Tensor | None:
    """(1, length) int32 sample index of each token of one packed row, from its `cu_seqlens`."""
    if packed_seq_params is None:
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    cu = packed_seq_params.cu_seqlens_q if cu is None else cu
    lengths = torch.diff(cu.to(device=device, dtype=torch.long), append=torch.tensor([length], device=device))
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device, dtype=torch.int32),
                                   lengths).unsqueeze(0)


class MambaMixer(MegatronModule):
    """The Mamba2 mixer of one tensor-parallel rank: its share of the heads and groups.

    in_proj is column-parallel: rank r's output is [z_r | x_r B_r C_r | dt_r], each part split over
    the ranks (`train.engines.mcore.weights` lays the full weight out that way); conv1d, dt_bias,
    A_log, D and the gated norm hold the rank's channels and heads; out_proj is row-parallel. The
    math between the projections is the native mixer's (`mamba_mix`).

    Context parallelism (megatron's `MambaContextParallel`): each context-parallel rank holds a
    slice of the row's tokens; an all-to-all before the conv gives every rank the whole sequence for
    1/cp of the heads, the scan runs there, and another all-to-all returns to sequence slices before
    the gated norm (which needs a group's channels together).
    """

    def __init__(self, config: TransformerConfig, submodules, d_model: int, lm: LanguageModelConfig,
                 kernels: Kernels, layer_number: int | None = None, pg_collection=None, pp_layer_offset: int = 0):
        super().__init__(config)
        tp = pg_collection.tp.size()
        self.kernels = kernels
        self.num_heads = divide(lm.mamba_num_heads, tp)
        self.n_groups = divide(lm.n_groups, tp)
        self.head_dim = lm.mamba_head_dim
        self.inner = self.num_heads * self.head_dim
        self.groups_state = self.n_groups * lm.ssm_state_size
        self.conv_dim = self.inner + 2 * self.groups_state
        self.conv_kernel, self.chunk_size, self.norm_eps = lm.conv_kernel, lm.chunk_size, lm.norm_eps
        self.dt_limit = mamba_dt_limit(lm)
        full_width = 2 * lm.mamba_intermediate_size + 2 * lm.n_groups * lm.ssm_state_size + lm.mamba_num_heads
        self.in_proj = build_module(submodules.in_proj, d_model, full_width, config=config,
                                    init_method=config.init_method, gather_output=False, bias=False,
                                    skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
                                    tp_group=pg_collection.tp)
        dtype = config.params_dtype
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, lm.conv_kernel, groups=self.conv_dim,
                                padding=lm.conv_kernel - 1, bias=True, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=dtype))
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=dtype))
        self.D = nn.Parameter(torch.empty(self.num_heads, dtype=dtype))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.inner, dtype=dtype))
        self.out_proj = build_module(submodules.out_proj, lm.mamba_intermediate_size, d_model, config=config,
                                     init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
                                     skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2",
                                     tp_group=pg_collection.tp)
        for p in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D, self.norm.weight):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        self._reset_ssm_parameters(lm, pg_collection.tp.rank(), tp)
        cp_group = pg_collection.cp
        self.cp = None
        if cp_group is not None and cp_group.size() > 1:
            self.cp = MambaContextParallel(cp_group, self.inner, self.num_heads, self.n_groups, lm.ssm_state_size,
                                           self.conv1d, self.dt_bias, self.A_log, self.D, D_has_hdim=False)

    @torch.no_grad()
    def _reset_ssm_parameters(self, lm: LanguageModelConfig, rank: int, tp: int) -> None:
        """The native initialisation of the rank's heads (fresh runs; a loaded checkpoint overwrites it)."""
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(lm.time_step_max) - math.log(lm.time_step_min))
                       + math.log(lm.time_step_min)).clamp(min=lm.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        first = rank * self.num_heads + 1
        self.A_log.copy_(torch.log(torch.arange(first, first + self.num_heads, dtype=torch.float32)))
        self.D.fill_(1.0)
        bound = 1 / math.sqrt(self.conv_kernel)
        nn.init.uniform_(self.conv1d.weight, -bound, bound)
        nn.init.uniform_(self.conv1d.bias, -bound, bound)

    def forward(self, hidden_states: Tensor, inference_context=None, packed_seq_params: PackedSeqParams | None = None,
                **_) -> tuple[Tensor, Tensor | None]:
        """(L, B, D) -> ((L, B, D), None); under sequence parallelism L is the rank's slice on both sides."""
        if inference_context is not None:
            raise NotImplementedError("generation runs on the native model (train.chat); convert with "
                                      "train.engines.mcore.weights")
        zxbcdt, _ = self.in_proj(hidden_states)  # (L, B, local width): the rank's tokens (all of them without CP)
        if self.cp is None:
            zxbcdt = zxbcdt.transpose(0, 1)  # (B, L, local width)
            seq_idx = packed_seq_idx(packed_seq_params, zxbcdt.shape[1], zxbcdt.device)
            y = mamba_mix(self, zxbcdt, seq_idx)  # (B, L, inner of this rank)
            return self.out_proj(y.transpose(0, 1).contiguous())
        # (L / cp, B, w) in load-balanced order -> (L, B, w / cp) in sequence order: 1/cp of the heads.
        zxbcdt = self.cp.pre_conv_ssm(zxbcdt).transpose(0, 1)
        seq_idx = packed_seq_idx(packed_seq_params, zxbcdt.shape[1], zxbcdt.device)
        y, z = mamba_scan(self._context_parallel_heads(), zxbcdt, seq_idx)  # (B, L, inner / cp) each
        gated = (y * F.silu(z)).transpose(0, 1)  # the gate, where z is whole: (L, B, inner / cp)
        gated = self.cp.post_conv_ssm(gated)  # back to (L / cp, B, inner) in load-balanced order
        y = self.kernels.gated_norm(gated, None, self.norm.weight, self.norm_eps, group_size=self.inner // self.n_groups)
        return self.out_proj(y.contiguous())

    def _context_parallel_heads(self) -> SimpleNamespace:
        """This rank's heads after the context-parallel all-to-all, in the shape `mamba_scan` reads."""
        cp = self.cp
        inner, groups = cp.d_inner_local_tpcp, cp.ngroups_local_tpcp
        groups_state = groups * cp.d_state
        return SimpleNamespace(
            kernels=self.kernels, num_heads=cp.nheads_local_tpcp, head_dim=self.head_dim, n_groups=groups,
            inner=inner, groups_state=groups_state, conv_dim=inner + 2 * groups_state, conv_kernel=self.conv_kernel,
            chunk_size=self.chunk_size, dt_limit=self.dt_limit, dt_bias=cp.get_dt_bias(), A_log=cp.get_A_log(),
            D=cp.get_D(), conv1d=SimpleNamespace(weight=cp.get_conv1d_weight(), bias=cp.get_conv1d_bias()))


class PackedCoreAttention(MegatronModule):
    """Causal core attention of one tensor-parallel rank's heads, per packed sample.

    Stands where megatron's DotProductAttention would (same constructor and forward), whose non-TE
    version refuses packed (THD) rows. THD input (T, heads, head_dim) with `packed_seq_params`, or
    (S, B, heads, head_dim) rows; computes through `kernels.attention` (varlen, isolated by cu_seqlens).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None,
                 kernels: Kernels = None):
        super().__init__(config)
        self.kernels = kernels
        self.softmax_scale = softmax_scale
        self.cp_group = pg_collection.cp if pg_collection is not None else None
        self.cp_size = self.cp_group.size() if self.cp_group is not None else 1

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: PackedSeqParams | None = None) -> Tensor:
        if self.cp_size > 1:
            return self._context_parallel(query, key, value, packed_seq_params)
        if packed_seq_params is not None:  # THD: (T, heads, head_dim)
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            out = self.kernels.attention(query, key, value, cu.to(torch.int32), causal=True,
                                         softmax_scale=self.softmax_scale)
            return out.flatten(1)  # (T, heads * head_dim)
        s, b = query.shape[:2]  # rows: (S, B, heads, head_dim), one sample per row
        rows = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=query.device)
        flat = [t.transpose(0, 1).flatten(0, 1) for t in (query, key, value)]  # (B * S, heads, head_dim)
        out = self.kernels.attention(*flat, rows, causal=True, softmax_scale=self.softmax_scale)
        return out.reshape(b, s, -1).transpose(0, 1)  # (S, B, heads * head_dim)

    def _context_parallel(self, query: Tensor, key: Tensor, value: Tensor, packed_seq_params: PackedSeqParams) -> Tensor:
        """Context-parallel attention: this rank's queries (T / cp, heads, head_dim), two contiguous
        chunks of the row (`load_balanced_order`), attend over every rank's keys and values
        (all-gathered: K/V are small under GQA). Each query chunk is cut at sample boundaries into
        pieces whose keys run from their sample's start to the piece's end, and `kernels.attention`
        computes them with separate key boundaries (causal, aligned bottom-right): the torch
        reference on CPU, flash-attn varlen on GPU."""
        total = query.shape[0] * self.cp_size
        keys, values = (gather_from_sequence_parallel_region(t, group=self.cp_group) for t in (key, value))
        # Gathered in rank order, each rank's load-balanced slice: back to row order.
        unpermute = torch.argsort(torch.cat([load_balanced_order(total, self.cp_size, r, query.device)
                                             for r in range(self.cp_size)]))
        keys, values = keys[unpermute], values[unpermute]
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        q_lengths, key_index = context_parallel_pieces(cu.tolist(), total, self.cp_size, self.cp_group.rank())
        cu_q = torch.tensor([0, *q_lengths], dtype=torch.int32, device=query.device).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0, *(len(r) for r in key_index)], dtype=torch.int32, device=query.device)
        cu_k = cu_k.cumsum(0, dtype=torch.int32)
        index = torch.cat([torch.arange(r.start, r.stop, device=query.device) for r in key_index])
        out = self.kernels.attention(query, keys[index], values[index], cu_q, causal=True,
                                     softmax_scale=self.softmax_scale, cu_seqlens_k=cu_k)
        return out.flatten(1)  # (T / cp, heads * head_dim)


def context_parallel_pieces(boundaries: list[int], total: int, cp: int, rank: int) -> tuple[list[int], list[range]]:
    """A context-parallel rank's queries cut at sample boundaries: (query count of each piece, in the
    rank's token order; the row positions of each piece's keys, from its sample's start to its end)."""
    chunk = total // (2 * cp)
    bounds = sorted(set(boundaries) | {total})
    q_lengths, keys = [], []
    for c in (rank, 2 * cp - 1 - rank):
        start, stop = c * chunk, (c + 1) * chunk
        for s0, s1 in zip(bounds, bounds[1:]):
            lo, hi = max(start, s0), min(stop, s1)
            if lo < hi:
                q_lengths.append(hi - lo)
                keys.append(range(s0, hi))
    return q_lengths, keys


def load_balanced_order(total: int, cp: int, rank: int, device: torch.device | None = None) -> Tensor:
    """The row positions context-parallel rank `rank` holds: the row split into 2 * cp chunks, rank r
    taking chunks r and 2cp - 1 - r (megatron's load balancing: causal attention costs the same on
    every rank)."""
    chunks = torch.arange(total, device=device).chunk(2 * cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])
