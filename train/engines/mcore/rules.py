"""The megatron-core engine's rules on a composed config: what it supports today and the shapes a
tensor / context / pipeline layout needs. Plain config checks (no megatron import), run by
`train.config.compose.load_config` through the engine."""

from __future__ import annotations

import os

from train.config.schema import DEFAULT_FP8_KEEP_PATTERNS, Config, ConfigError


def validate(cfg: Config) -> None:
    """What the megatron-core engine supports today, and the shapes a layout needs."""
    if cfg.model.compile:
        raise ConfigError("model.compile=true compiles the native engine's layers; with model.impl=mcore leave it false")
    par, lm = cfg.parallel, cfg.model.language_model
    # Under torchrun the job's size is known: a layout bigger than it (or not dividing it) cannot start.
    world = os.environ.get("WORLD_SIZE")
    model_ranks = par.tensor_parallel * par.context_parallel * par.pipeline_parallel
    if world and world.isdigit() and int(world) % model_ranks:
        raise ConfigError(
            f"parallel.tensor_parallel={par.tensor_parallel} x context_parallel={par.context_parallel} x "
            f"pipeline_parallel={par.pipeline_parallel} = {model_ranks} ranks per model replica, but this job has "
            f"WORLD_SIZE={world} processes: launch a multiple of {model_ranks} (torchrun --nproc-per-node) or "
            "shrink the layout")
    if len(lm.pattern) % par.pipeline_parallel:
        raise ConfigError(f"parallel.pipeline_parallel={par.pipeline_parallel} must divide the "
                          f"{len(lm.pattern)} layers of model.language_model.pattern: each stage takes an equal run")
    if cfg.peft.enabled:
        _check_adapters(cfg)
    if par.data_parallel == "fsdp":
        raise ConfigError("model.impl=mcore shards with its own layout: set parallel.data_parallel=ddp")
    _check_fp8(cfg)
    tp = par.tensor_parallel
    _check_divides(tp, {"model.language_model.mamba_num_heads": lm.mamba_num_heads,
                        "model.language_model.n_groups": lm.n_groups,
                        "model.language_model.num_attention_heads": lm.num_attention_heads,
                        "model.language_model.num_key_value_heads": lm.num_key_value_heads,
                        "model.language_model.vocab_size": lm.vocab_size})
    cp = par.context_parallel
    if cp > 1 and cfg.model.kernels.attention == "transformer_engine":
        raise ConfigError("parallel.context_parallel > 1 with model.kernels.attention=transformer_engine: TE's "
                          "context-parallel attention expects each sample padded to 2 x context_parallel chunks, "
                          "which the packer does not do yet; use model.kernels.attention=torch, flash_attn or torch_varlen")
    _check_divides(tp * cp, {"model.language_model.mamba_num_heads": lm.mamba_num_heads})
    groups = lm.n_groups // tp
    if groups % cp and cp % groups:
        raise ConfigError(f"model.language_model.n_groups / tensor_parallel = {groups} and "
                          f"parallel.context_parallel={cp}: one must divide the other")
    # Each context-parallel rank takes 2 of 2 * cp equal chunks of the row, then 1/tp of its slice under SP.
    slices = 2 * cp * (tp if par.sequence_parallel else 1)
    if (cfg.trainer.micro_batch_size * cfg.data.seq_length) % slices:
        raise ConfigError(f"trainer.micro_batch_size x data.seq_length = "
                          f"{cfg.trainer.micro_batch_size * cfg.data.seq_length} tokens must split into {slices} "
                          f"equal slices (2 x context_parallel{' x tensor_parallel' if par.sequence_parallel else ''})")


def _check_adapters(cfg: Config) -> None:
    """LoRA on megatron's tensor-parallel linears is ours (`train.engines.mcore.adapters`): what it
    does not do yet is refused here, naming what to set."""
    peft = cfg.peft
    if peft.dropout > 0:
        raise ConfigError(f"peft.dropout={peft.dropout} on model.impl=mcore: adapter dropout would need the same mask "
                          "on every tensor-parallel rank, which is not built; set peft.dropout=0")


def _check_fp8(cfg: Config) -> None:
    """FP8 on megatron-core is megatron's own: its config's fp8_* fields from ours, Transformer
    Engine linears (the TE spec) in every language-model layer, delayed scaling over the whole
    stack (megatron's FP8 context); the embedding, head, vision tower and projector stay in bf16."""
    prec = cfg.precision
    if prec.name == "fp8_delayed_emulated":
        raise ConfigError("precision=fp8_delayed_emulated emulates FP8 in the native engine's linears; with "
                          "model.impl=mcore use precision=fp8_delayed (GPU, Transformer Engine) or bf16")
    if prec.name != "fp8_delayed":
        return
    if cfg.model.kernels.attention != "transformer_engine":
        raise ConfigError("precision=fp8_delayed with model.impl=mcore runs megatron's Transformer Engine layers: "
                          "set model.kernels.attention=transformer_engine")
    if prec.keep_first_last_layers:
        raise ConfigError(f"precision.keep_first_last_layers={prec.keep_first_last_layers}: megatron-core runs "
                          "delayed scaling over the whole hybrid stack and keeps no layer in bf16 under it; set "
                          "precision.keep_first_last_layers=0 with model.impl=mcore")
    if sorted(prec.keep_patterns) != sorted(DEFAULT_FP8_KEEP_PATTERNS):
        raise ConfigError(f"precision.keep_patterns={prec.keep_patterns}: with model.impl=mcore the FP8 region is "
                          "every linear of the language model's layers (megatron's TE spec); leave keep_patterns "
                          "at its default")


def _check_divides(tp: int, pairs: dict[str, int]) -> None:
    for field_path, value in pairs.items():
        if value % tp:
            raise ConfigError(f"{field_path}={value} must be a multiple of parallel.tensor_parallel={tp}: each "
                              "tensor-parallel rank holds an equal share")
