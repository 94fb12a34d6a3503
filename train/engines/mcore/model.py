"""The hybrid language model on megatron-core, with the native model's interface.

`McoreLanguageModel` wraps megatron's `MambaModel` (our spec) and offers what the vision-language
model and the tools use from a language model: `embed_tokens`, `hidden_states` over packed rows,
the output head's weight, `forward(input_ids, cu_seqlens)` -> logits. Rows of a micro-batch are
flattened into one packed THD row (megatron's packed-sequence layout): its `cu_seqlens` already
mark every sample and row boundary, so Mamba state and attention stay inside samples. Embeddings
are computed whole on every tensor-parallel rank (so media can be spliced in), then scattered
along the sequence when sequence parallelism is on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.mamba import MambaModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from torch import Tensor, nn

from train.config.schema import KernelConfig, LanguageModelConfig, ParallelConfig, PrecisionConfig
from train.model.language_model import HybridLanguageModel, packing_metadata
from train.engines.mcore import compat, weights
from train.engines.mcore.layers import load_balanced_order
from train.engines.mcore.spec import SpecKind, hybrid_stack_spec
from train.ops.activations import squared_relu
from train.ops.dispatch import resolve_kernels
from train.parallel.dims import ParallelDims, ProcessGroups


def fp8_fields(precision: PrecisionConfig | None) -> dict:
    """megatron's FP8 settings from our precision group (same meaning, megatron's names): delayed
    scaling, which megatron's hybrid stack applies over the whole decoder pass."""
    if precision is None or precision.name != "fp8_delayed":
        return {}
    return {"fp8": precision.fp8_format, "fp8_recipe": "delayed", "fp8_margin": precision.margin,
            "fp8_amax_history_len": precision.amax_history_len,
            "fp8_amax_compute_algo": precision.amax_compute_algo, "fp8_wgrad": precision.fp8_wgrad}


def transformer_config(lm: LanguageModelConfig, parallel: ParallelConfig, params_dtype: torch.dtype,
                       device: torch.device, precision: PrecisionConfig | None = None) -> TransformerConfig:
    """megatron's config for our language model and layout (no dropout, no biases, RMSNorm, no
    positional embedding, squared-ReLU MLP: Nemotron-H), and our FP8 settings."""
    on_cpu = device.type == "cpu"
    return TransformerConfig(
        **fp8_fields(precision),
        num_layers=len(lm.pattern), hidden_size=lm.hidden_size, ffn_hidden_size=lm.mlp_hidden_size,
        num_attention_heads=lm.num_attention_heads, num_query_groups=lm.num_key_value_heads, kv_channels=lm.head_dim,
        mamba_num_heads=lm.mamba_num_heads, mamba_head_dim=lm.mamba_head_dim, mamba_state_dim=lm.ssm_state_size,
        mamba_num_groups=lm.n_groups, is_hybrid_model=True, normalization="RMSNorm", layernorm_epsilon=lm.norm_eps,
        add_bias_linear=False, add_qkv_bias=False, gated_linear_unit=False, activation_func=squared_relu,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=lm.initializer_range,
        tensor_model_parallel_size=parallel.tensor_parallel, sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel, pipeline_model_parallel_size=parallel.pipeline_parallel,
        # What flows between pipeline stages (`train.engines.mcore.pipeline`).
        pipeline_dtype=params_dtype if parallel.pipeline_parallel > 1 else None,
        # Each rank draws its own shard on the CPU (no CUDA RNG tracker state needed on GPU either);
        # `reset_parameters` or a checkpoint then sets the weights.
        params_dtype=params_dtype, use_cpu_initialization=True, perform_initialization=True,
        attention_backend=AttnBackend.local if on_cpu else AttnBackend.auto,
        # Fusions are CUDA kernels or torch.compile'd: off, our ops are already the chosen backends.
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False,
    )


EXACT_INIT_MAX_PARAMS = 2_000_000_000
_LAYERS = "decoder.layers."


class McoreLanguageModel(nn.Module):
    def __init__(self, lm: LanguageModelConfig, kernels: KernelConfig, parallel: ParallelConfig,
                 device: torch.device, spec: SpecKind | None = None, params_dtype: torch.dtype = torch.float32,
                 precision: PrecisionConfig | None = None):
        """`spec`: "te" (Transformer Engine layers) when `kernels.attention=transformer_engine`, else
        "local" (megatron's own linears; our core attention through `kernels.attention`).
        `precision=fp8_delayed` turns on megatron's FP8 (`fp8_fields`; the TE spec)."""
        super().__init__()
        compat.check_version()
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("megatron's model-parallel state is not set up: call "
                               "train.engines.mcore.model.initialize_megatron(parallel, device) first")
        self.cfg, self.device = lm, device
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank, self.tp_size = self.tp_group.rank(), self.tp_group.size()
        self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_rank, self.cp_size = self.cp_group.rank(), self.cp_group.size()
        # Pipeline stage: megatron gives each of the `pp_size` stages an equal run of the layers; the
        # first embeds, the last holds the final norm and the head.
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_rank, self.pp_size = self.pp_group.rank(), self.pp_group.size()
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.layers_per_stage = len(lm.pattern) // self.pp_size
        self.layer_offset = self.pp_rank * self.layers_per_stage
        self.sequence_parallel = parallel.sequence_parallel
        config = transformer_config(lm, parallel, params_dtype, device, precision)
        self.model = MambaModel(
            config=config,
            mamba_stack_spec=hybrid_stack_spec(lm, resolve_kernels(kernels), spec or _spec_for(kernels),
                                               kernels.activation_checkpointing == "layers"),
            vocab_size=lm.vocab_size, max_sequence_length=2**31 - 1, hybrid_override_pattern=lm.pattern,
            # hybrid_*_ratio stay 0: the pattern alone places the layers.
            position_embedding_type="none", share_embeddings_and_output_weights=False, parallel_output=True,
            # Embeddings stay whole (media are spliced into them); `hidden_states` scatters them.
            scatter_embedding_sequence_parallel=False,
            pre_process=self.pre_process, post_process=self.post_process,
        ).to(device)
        self.params_dtype = params_dtype

    # -- names: megatron numbers the layers of each pipeline stage from 0 -----------------------------
    def global_name(self, name: str) -> str:
        """This stage's megatron parameter name -> its name in the whole model (`weights` speaks those)."""
        if not name.startswith(_LAYERS):
            return name
        index, rest = name[len(_LAYERS):].split(".", 1)
        return f"{_LAYERS}{int(index) + self.layer_offset}.{rest}"

    def local_name(self, name: str) -> str | None:
        """A whole-model megatron name -> this stage's, or None when another stage holds it."""
        if name.startswith(_LAYERS):
            index, rest = name[len(_LAYERS):].split(".", 1)
            local = int(index) - self.layer_offset
            return f"{_LAYERS}{local}.{rest}" if 0 <= local < self.layers_per_stage else None
        if name.startswith("embedding."):
            return name if self.pre_process else None
        if name.startswith(("output_layer.", "decoder.final_norm.")):
            return name if self.post_process else None
        return name

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The native model's initialisation, drawn from `generator` exactly as the native model
        draws it, then split: a fresh run starts from the same weights on either engine. That
        builds the whole language model once on the CPU, so above `EXACT_INIT_MAX_PARAMS` (the 12B
        on every rank would need ~50 GB of host memory each) the weights megatron drew at
        construction stay (the same distributions; real runs of such models start from a
        checkpoint, which `init.from_checkpoint` loads over them)."""
        total = sum(p.numel() for p in self.model.parameters()) * self.tp_size * self.pp_size
        if total > EXACT_INIT_MAX_PARAMS:
            return
        native = HybridLanguageModel(self.cfg)
        native.reset_parameters(generator)
        self.load_native_state(native.state_dict())

    def load_native_state(self, state: dict[str, Tensor]) -> None:
        """Whole native-named weights (`backbone.*`, `lm_head.weight`) -> this rank's parameters
        (its tensor-parallel shards of its pipeline stage's layers)."""
        full = weights.native_to_megatron(state, self.cfg)
        mine = {self.local_name(k): v for k, v in weights.shard_state(full, self.cfg, self.tp_rank, self.tp_size).items()}
        weights.load_local_state(self.model, {k: v.to(self.device) for k, v in mine.items() if k is not None})

    def gather_local(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """{this stage's megatron name: this rank's tensor} -> {whole-model megatron name: whole
        tensor}, on every rank of the tensor-parallel group."""
        local = {self.global_name(name): t for name, t in local.items()}
        if self.tp_size == 1:
            return {name: t.detach().clone() for name, t in local.items()}
        shards: list[dict[str, Tensor]] = [{} for _ in range(self.tp_size)]
        for name in sorted(local):  # the same order on every rank: these are collectives
            tensor = local[name]
            parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
            dist.all_gather(parts, tensor.detach().contiguous(), group=self.tp_group)
            for rank, part in enumerate(parts):
                shards[rank][name] = part
        return weights.unshard_state(shards, self.cfg)

    @property
    def head_weight(self) -> Tensor:
        """This rank's rows of the output head (V / tp, D)."""
        return self.model.output_layer.weight

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, L) -> (B, L, D), whole on every tensor-parallel rank."""
        return self.model.embedding.word_embeddings(input_ids)

    def set_input_tensor(self, tensor: Tensor) -> None:
        """A later pipeline stage's input: the previous stage's output (`train.engines.mcore.pipeline`)."""
        self.model.set_input_tensor(tensor)

    def hidden_states(self, embeds: Tensor | None, seq_idx: Tensor | None, cu_seqlens: Tensor,
                      rows: tuple[int, int] | None = None) -> Tensor:
        """(B, L, D) input embeddings -> final normalised hidden states of this rank's tokens, ready
        for its slice of the vocabulary-parallel head (their gradient is summed over the
        tensor-parallel ranks): (B, L, D), or (1, B * L / cp, D) under context parallelism, in the
        order `local_tokens` gives. `cu_seqlens` marks the samples over the flattened B * L tokens.

        Pipeline stages: a stage after the first takes no embeddings (its input came through
        `set_input_tensor`; `rows` = (B, L) gives the shape), and a stage before the last returns
        its layers' raw output for the next stage, (B * L / cp [/ tp under SP], 1, D).
        """
        b, l = rows if embeds is None else embeds.shape[:2]
        d = self.cfg.hidden_size
        cu = cu_seqlens.to(device=self.device, dtype=torch.int32)
        lengths = torch.diff(cu)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
        stage_input = None  # a later pipeline stage: the decoder reads its input tensor
        if self.pre_process:
            stage_input = embeds.reshape(b * l, 1, d)  # one packed THD row: (T, 1, D)
            if self.cp_size > 1:  # (T / cp, 1, D)
                stage_input = stage_input[load_balanced_order(b * l, self.cp_size, self.cp_rank, self.device)]
            if self.sequence_parallel:
                stage_input = tensor_parallel.scatter_to_sequence_parallel_region(stage_input, group=self.tp_group)
        hidden = self.model.decoder(hidden_states=stage_input, attention_mask=None, packed_seq_params=packed)
        if not self.post_process:
            return hidden
        if self.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=self.tp_group)
        else:
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        return hidden.reshape(b, l, d) if self.cp_size == 1 else hidden.reshape(1, -1, d)

    def local_tokens(self, tensor: Tensor) -> Tensor:
        """A per-token batch tensor (B, L, ...) in the layout of `hidden_states`: this
        context-parallel rank's tokens (1, B * L / cp, ...), or unchanged without context parallelism."""
        if self.cp_size == 1:
            return tensor
        flat = tensor.reshape(-1, *tensor.shape[2:])
        return flat[load_balanced_order(flat.shape[0], self.cp_size, self.cp_rank, flat.device)].unsqueeze(0)

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) over the whole vocabulary (gathered from the tensor-parallel ranks), as
        `HybridLanguageModel.forward`: for evaluation and parity checks; training uses the chunked
        vocabulary-parallel loss instead. One pipeline stage only (a pipeline's stages run through
        `train.engines.mcore.pipeline`)."""
        if self.pp_size > 1:
            raise RuntimeError("logits of a pipeline-parallel model: run the stages with train.engines.mcore.pipeline")
        seq_idx, cu_seqlens = packing_metadata(input_ids.shape, cu_seqlens, input_ids.device)
        hidden = self.hidden_states(self.embed_tokens(input_ids), seq_idx, cu_seqlens)
        if self.cp_size > 1:  # every rank's tokens, back in row order
            b, l = input_ids.shape
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden[0], group=self.cp_group)
            order = torch.cat([load_balanced_order(b * l, self.cp_size, r, hidden.device) for r in range(self.cp_size)])
            hidden = hidden[torch.argsort(order)].reshape(b, l, -1)
        logits = hidden @ self.head_weight.t()  # (B, L, V / tp)
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.tp_group)


def initialize_megatron(parallel: ParallelConfig, device: torch.device) -> None:
    """megatron's model-parallel groups (same rank order as `train.parallel.dims`) and RNG tracker,
    on an initialised torch.distributed world."""
    compat.check_version()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel, pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel, virtual_pipeline_model_parallel_size=None,
        order="tp-cp-ep-dp-pp")
    compat.install_cpu_support(device)
    compat.initialize_rng_tracker(device)


def _spec_for(kernels: KernelConfig) -> SpecKind:
    return "te" if kernels.attention == "transformer_engine" else "local"


def megatron_process_groups(parallel: ParallelConfig, dims: ParallelDims, rank: int,
                            device: torch.device) -> ProcessGroups:
    """Set up megatron (`initialize_megatron`) and hand its groups to the parallel seam, so each group
    of the layout exists once (same rank order: tested against megatron's RankGenerator)."""
    initialize_megatron(parallel, device)
    return ProcessGroups.adopt(dims, rank, {
        "tensor": parallel_state.get_tensor_model_parallel_group(),
        "context": parallel_state.get_context_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
        "data_context": parallel_state.get_data_parallel_group(with_context_parallel=True),
        "pipeline": parallel_state.get_pipeline_model_parallel_group(),
        "world": dist.group.WORLD,
    })
