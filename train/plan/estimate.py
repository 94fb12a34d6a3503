"""Parameter counts and per-GPU memory of a recipe, from its model built on the meta device.

Memory is per GPU under the recipe's parallel layout (`parallel.*`, `--world-size`): the language
model's weights, gradients and optimizer state are split over tensor x pipeline ranks; the vision
tower and projector are whole on every rank; the optimizer state is further sharded over the
data-parallel ranks by FSDP (`parallel.data_parallel=fsdp`, with weights and gradients) or by
megatron-core's distributed optimizer (`parallel.distributed_optimizer=true`, over data x context).
Activations: context parallelism gives each rank 1/cp of the tokens, tensor parallelism splits the
mixers' inner activations (and with sequence parallelism the layer inputs), pipeline stages hold
their share of the layers with up to pp micro-batches in flight on the first stage (1F1B).
- 16-bit compute (bf16, fp8_delayed): bf16 weights (2 B/param, every parameter) for the forward,
  fp32 gradients (4 B) and an fp32 master copy + Adam m + v (12 B) per trainable parameter.
- fp32 compute: fp32 weights (4 B, also the master), fp32 gradients (4 B), Adam m + v (8 B).
- Activations of one micro-batch (`trainer.micro_batch_size` rows of `data.seq_length` tokens),
  as stored for backward with the fused kernels (mamba_ssm, causal_conv1d, flash-attn recompute
  their internals; the CPU reference ops store more), in the compute dtype:
  per token, Mamba 2D + 2*conv_dim + 3*d_inner + heads, attention 2D + 2*q_width + 2*kv_width +
  fp32 softmax stats, MLP 2D + 2*ffn (the relu^2 output and the down_proj input), ViT block
  8*Dv + 2*mlp (only when the ViT trains), projector 8*Dv + 2*hidden per image token (when the
  projector or ViT trains). With `model.kernels.activation_checkpointing=layers` a layer keeps
  only its input and one layer of each tower is live again during its recompute. The LM head and
  loss run `model.loss_chunk_size` rows at a time (recomputed): the final hidden states plus one
  chunk of logits (compute dtype + fp32 upcast + fp32 gradient) are live, never the full logits.
  Worst case for media: every token of a row is an image token (seq_length / tokens_per_tile tiles).
- Adapters (`peft=lora|dora`, native engine, one replica): the targeted linears of the trainable
  parts get rank-r A (r x in) and B (out x r) (+ a magnitude per output feature with DoRA); the
  trainable parameters are the adapters and the trainable parts without adapters. Frozen linear
  weights are held in the compute dtype (2 B under bf16, no master, no gradient, no optimizer
  state); other frozen parameters (embeddings, norms, SSM) stay fp32 (4 B). Activations as for full
  training (backward still runs through every layer; the rank-r adapter outputs are negligible).
- The longest context on one GPU: the largest `data.seq_length` (a multiple of 1024) whose total
  fits `ONE_GPU_GIB` with this recipe's settings, printed when the layout is one GPU.
"""

from __future__ import annotations

import dataclasses

import torch

from train.config.compose import compose_raw
from train.config.schema import Config, ConfigError, KernelConfig, ModelConfig, from_dict
from train.engines import resolve_engine

PARTS = ("language_model", "vision_model", "projector")
GIB = 2**30
# What one 80 GB GPU (H100 / A100 80GB: 81,559 MiB) leaves for training after the CUDA context and the
# allocator's fragmentation: the budget `longest context on one GPU` fits.
ONE_GPU_GIB = 76.0


def load_plan_config(config_name: str, overrides: list[str]) -> Config:
    """Composed, typed config with the model, trainable and precision sections validated; the data
    section is typed but not checked against the file system."""
    cfg = from_dict(Config, compose_raw(config_name, overrides))
    for name in ("model", "trainable", "precision"):
        getattr(cfg, name).validate(name)
    return cfg


def meta_model(model_cfg: ModelConfig):
    """The recipe's VLM built on the meta device (shapes only, no memory)."""
    from train.model.vlm import VisionLanguageModel

    # Kernel choice never changes shapes; the torch twins need no GPU library to build.
    cfg = dataclasses.replace(model_cfg, kernels=KernelConfig())
    with torch.device("meta"):
        return VisionLanguageModel(cfg, image_token_id=0)


def count_parameters(model) -> dict[str, int]:
    """Parameter counts of each VLM part, from the real modules."""
    return {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in PARTS}


def fp8_modules(model, cfg: Config) -> list[str]:
    """The Linear modules that run in FP8 under this recipe's precision (none outside FP8)."""
    if not cfg.precision.is_fp8:
        return []
    from train.precision.region import fp8_linear_names

    return fp8_linear_names(model, cfg.precision.keep_patterns, cfg.precision.keep_first_last_layers)


def activation_bytes(cfg: Config) -> dict:
    """Bytes of activations live on one GPU in a micro-batch's backward, per part and LM layer kind,
    under the recipe's parallel layout (`parallel.*`)."""
    m, lm, vit, par = cfg.model, cfg.model.language_model, cfg.model.vision, cfg.parallel
    a = 2 if cfg.precision.resolved_compute_dtype == "bf16" else 4
    # Context parallelism gives each rank 1/cp of every row's tokens.
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_length // par.context_parallel
    tp = par.tensor_parallel
    # Sequence parallelism splits the layer inputs and norms (the 2D terms) over the tensor-parallel
    # ranks too; without it they are replicated on each.
    sp = tp if par.sequence_parallel else 1
    checkpointed = m.kernels.activation_checkpointing == "layers"
    d, inner = lm.hidden_size, lm.mamba_intermediate_size
    conv_dim = inner + 2 * lm.n_groups * lm.ssm_state_size
    q, kv = lm.num_attention_heads * lm.head_dim, lm.num_key_value_heads * lm.head_dim
    per_token = {  # elements stored per token by one layer of each kind (the docstring's formulas)
        "mamba": 2 * d / sp + (2 * conv_dim + 3 * inner + lm.mamba_num_heads) / tp,
        "attention": 2 * d / sp + (2 * q + 2 * kv + lm.num_attention_heads * 4 // a) / tp,
        "mlp": 2 * d / sp + 2 * lm.mlp_hidden_size / tp,
    }
    kinds = {"M": "mamba", "*": "attention", "-": "mlp"}
    # Pipeline stages hold pattern / pp layers each; under 1F1B the first stage keeps the
    # activations of up to pp micro-batches in flight.
    pp = par.pipeline_parallel
    in_flight = min(pp, cfg.trainer.grad_accum_steps) if pp > 1 else 1
    counts = {kind: sum(kinds[c] == kind for c in lm.pattern) / pp for kind in per_token}
    stored = {kind: d / sp if checkpointed else per_token[kind] for kind in per_token}
    lm_layers = {kind: counts[kind] * stored[kind] * tokens * a * in_flight for kind in per_token}
    if checkpointed:  # the layer being recomputed holds its full set again
        lm_layers["recompute"] = max(per_token[k] for k in per_token if counts[k]) * tokens * a
    chunk = min(m.loss_chunk_size, tokens)
    # The output head is split over the vocabulary (tensor parallel): a chunk of logits is V / tp wide.
    lm_layers["head_and_loss"] = 2 * d * tokens * a / sp + chunk * lm.vocab_size / tp * (a + 8)
    lm_layers = {k: int(v) for k, v in lm_layers.items()}

    # The vision tower and projector are replicated on every rank of a replica (data parallel
    # only), each encoding the media of the rows it holds: worst case, every token an image token.
    tiles = tokens // m.tokens_per_tile
    vit_tokens = tiles * (vit.patches_per_side ** 2 + vit.num_prefix_tokens)
    vit_block = 8 * vit.hidden_size + 2 * int(vit.hidden_size * vit.mlp_ratio)
    vision = 0
    if cfg.trainable.vision_model:
        stored_vit = vit.hidden_size if checkpointed else vit_block
        vision = (vit.num_layers * stored_vit + (vit_block if checkpointed else 0)) * vit_tokens * a
    projector = 0
    if cfg.trainable.projector or cfg.trainable.vision_model:
        projector = (2 * 4 * vit.hidden_size + 2 * m.projector.hidden_size) * tiles * m.tokens_per_tile * a
    return {"language_model": lm_layers, "vision_model": vision, "projector": projector}


def layout(cfg: Config, world_size: int | None) -> dict:
    """The parallel layout the estimate is for: data parallelism takes what tensor x context x
    pipeline leave of `world_size` (default: one replica)."""
    par = cfg.parallel
    model_parallel = par.tensor_parallel * par.context_parallel * par.pipeline_parallel
    world = world_size or model_parallel
    if world % model_parallel:
        raise ConfigError(f"--world-size {world} is not a multiple of tensor x context x pipeline = {model_parallel}")
    sharded = resolve_engine(cfg.model.impl).sharding(par)
    return {"world_size": world, "data": world // model_parallel, "tensor": par.tensor_parallel,
            "sequence_parallel": par.sequence_parallel, "context": par.context_parallel,
            "pipeline": par.pipeline_parallel, "impl": cfg.model.impl, "data_parallel_sharding": sharded,
            "vision": "replicated on every rank (data parallel only)" if par.pipeline_parallel == 1
            else "replicated on every rank of the first pipeline stage (data parallel only)"}


def adapter_params(model, cfg: Config) -> dict:
    """With `peft`: the adapter count, and per part the parameters that stay frozen in an adapted part
    (its linears' bases and its other parameters)."""
    from torch import nn

    from train.engines.native.adapters import target_module_names

    names = target_module_names(model, cfg.peft, cfg.trainable)
    by_part, frozen_linear = {part: 0 for part in PARTS}, {part: 0 for part in PARTS}
    for name in names:
        linear = model.get_submodule(name)
        part = name.split(".", 1)[0]
        by_part[part] += cfg.peft.rank * (linear.in_features + linear.out_features)
        by_part[part] += linear.out_features if cfg.peft.method == "dora" else 0
    adapted_parts = {name.split(".", 1)[0] for name in names}
    for part in PARTS:
        for name, module in getattr(model, part).named_modules():
            frozen = part in adapted_parts or not getattr(cfg.trainable, part)
            # megatron-core casts its layers' linears, not its vocabulary-parallel head (`cast_frozen_base`).
            kept = cfg.model.impl == "mcore" and name == "lm_head"
            if type(module) is nn.Linear and frozen and not kept:
                frozen_linear[part] += module.weight.numel()
    return {"adapters": sum(by_part.values()), "adapters_by_part": by_part, "adapted_parts": sorted(adapted_parts),
            "modules": len(names), "frozen_linear": frozen_linear}


def make_plan(cfg: Config, recipe: str, world_size: int | None = None) -> dict:
    model = meta_model(cfg.model)
    params = count_parameters(model)
    in_fp8 = fp8_modules(model, cfg)
    flags = {part: getattr(cfg.trainable, part) for part in PARTS}
    total = sum(params.values())
    lay = layout(cfg, world_size)
    if cfg.peft.enabled:
        return adapter_plan(cfg, recipe, model, params, in_fp8, lay)
    trainable = sum(n for part, n in params.items() if flags[part])
    # Per GPU: the language model is split over tensor x pipeline ranks; the vision tower and
    # projector are whole on every rank.
    lm_share = 1 / (lay["tensor"] * lay["pipeline"])
    per_gpu = {part: n * (lm_share if part == "language_model" else 1) for part, n in params.items()}
    held = sum(per_gpu.values())
    held_trainable = sum(n for part, n in per_gpu.items() if flags[part])
    bf16 = cfg.precision.resolved_compute_dtype == "bf16"
    per_param = {"weights": 2 if bf16 else 4, "gradients": 4, "optimizer": 12 if bf16 else 8}
    fsdp = lay["impl"] == "native" and cfg.parallel.data_parallel == "fsdp"
    # The distributed optimizer shards optimizer state over data x context ranks; FSDP shards all three.
    optimizer_shards = lay["data"] * (lay["context"] if lay["impl"] == "mcore" else 1) \
        if (fsdp or cfg.parallel.distributed_optimizer) else 1
    state_shards = lay["data"] if fsdp else 1
    acts = activation_bytes(cfg)
    act_total = sum(acts["language_model"].values()) + acts["vision_model"] + acts["projector"]
    memory = {
        "weights": per_param["weights"] * held / state_shards / GIB,
        "gradients": per_param["gradients"] * held_trainable / state_shards / GIB,
        "optimizer": per_param["optimizer"] * held_trainable / optimizer_shards / GIB,
        "activations": act_total / GIB,
    }
    memory["total"] = sum(memory.values())
    plan = {
        "recipe": recipe,
        "stage": cfg.stage,
        "model": cfg.model.name,
        "layout": lay,
        "params": {**params, "total": total, "trainable": trainable},
        "trainable_parts": flags,
        "precision": cfg.precision.name,
        "fp8_modules": in_fp8,
        "memory_gib": memory,
        "activations_gib": _activations_gib(acts),
        "assumptions": {
            "bytes_per_param": {"weights (every param)": per_param["weights"],
                                "gradients (trainable)": per_param["gradients"],
                                "optimizer (trainable)": per_param["optimizer"]},
            **_shared_assumptions(cfg, bf16),
            "per_gpu": "language model / (tensor x pipeline); vision and projector whole on every rank",
        },
    }
    if lay["world_size"] == 1:
        plan["longest_context_one_gpu"] = longest_context(cfg, memory["total"] - memory["activations"])
    return plan


def adapter_plan(cfg: Config, recipe: str, model, params: dict, in_fp8: list[str], lay: dict) -> dict:
    """`make_plan` with adapters: frozen bases in the compute dtype, state for the trainable tensors
    only; per GPU, the language model's share (its base and, approximately, its adapters: megatron-core
    splits B of a column-parallel linear and A of a row-parallel one) is 1 / (tensor x pipeline)."""
    flags = {part: getattr(cfg.trainable, part) for part in PARTS}
    counted = adapter_params(model, cfg)
    trained_whole = {p: params[p] if flags[p] and p not in counted["adapted_parts"] else 0 for p in PARTS}
    trainable = {p: counted["adapters_by_part"][p] + trained_whole[p] for p in PARTS}
    frozen = {p: params[p] - trained_whole[p] for p in PARTS}
    share = {p: 1 / (lay["tensor"] * lay["pipeline"]) if p == "language_model" else 1 for p in PARTS}
    bf16 = cfg.precision.resolved_compute_dtype == "bf16"
    a = 2 if bf16 and cfg.peft.base_dtype == "compute" else 4
    per_param = {"weights": 2 if bf16 else 4, "gradients": 4, "optimizer": 12 if bf16 else 8}
    acts = activation_bytes(cfg)
    act_total = sum(acts["language_model"].values()) + acts["vision_model"] + acts["projector"]
    held_trainable = sum(trainable[p] * share[p] for p in PARTS)
    fl = counted["frozen_linear"]
    memory = {
        "weights": sum(share[p] * (fl[p] * a + (frozen[p] - fl[p]) * 4 + trainable[p] * per_param["weights"])
                       for p in PARTS) / GIB,
        "gradients": per_param["gradients"] * held_trainable / GIB,
        "optimizer": per_param["optimizer"] * held_trainable / GIB,
        "activations": act_total / GIB,
    }
    memory["total"] = sum(memory.values())
    per_gpu = ("the whole model on every GPU (native engine, data parallel)" if lay["impl"] == "native" else
               "language model and its adapters / (tensor x pipeline); vision and projector whole on every rank")
    plan = {
        "recipe": recipe, "stage": cfg.stage, "model": cfg.model.name, "layout": lay,
        "params": {**params, "total": sum(params.values()), "trainable": sum(trainable.values())},
        "trainable_parts": flags, "precision": cfg.precision.name, "fp8_modules": in_fp8,
        "peft": {"method": cfg.peft.method, "rank": cfg.peft.rank, "targets": cfg.peft.targets,
                 "adapted_modules": counted["modules"], "adapter_params": counted["adapters"],
                 "trained_whole": sum(trained_whole.values()), "frozen_base_bytes_per_param": a},
        "memory_gib": memory,
        "activations_gib": _activations_gib(acts),
        "assumptions": {
            "bytes_per_param": {"frozen linear weights": a, "other frozen weights": 4,
                                "trainable weights": per_param["weights"], "gradients (trainable)": 4,
                                "optimizer (trainable)": per_param["optimizer"]},
            **_shared_assumptions(cfg, bf16),
            "per_gpu": per_gpu,
        },
    }
    if lay["tensor"] * lay["context"] * lay["pipeline"] == 1:  # the whole model on each GPU
        plan["longest_context_one_gpu"] = longest_context(cfg, memory["total"] - memory["activations"])
    return plan


def _activations_gib(acts: dict) -> dict:
    return {"language_model": {k: v / GIB for k, v in acts["language_model"].items()},
            "vision_model": acts["vision_model"] / GIB, "projector": acts["projector"] / GIB}


def _shared_assumptions(cfg: Config, bf16: bool) -> dict:
    """What every plan assumes, with or without adapters."""
    return {"optimizer_states": "fp32 master + Adam m, v" if bf16 else "Adam m, v (weights are the master)",
            "compute_dtype": cfg.precision.resolved_compute_dtype,
            "tokens_per_micro_batch": cfg.trainer.micro_batch_size * cfg.data.seq_length,
            "activation_checkpointing": cfg.model.kernels.activation_checkpointing,
            "loss_chunk_size": cfg.model.loss_chunk_size,
            "media": "worst case: every token an image token"}


def longest_context(cfg: Config, fixed_gib: float, budget_gib: float = ONE_GPU_GIB) -> dict:
    """The largest `data.seq_length` (a multiple of 1024) whose activations fit beside `fixed_gib`
    (weights, gradients, optimizer) in `budget_gib`; 0 when the fixed part alone does not fit."""
    import copy

    def fits(seq: int) -> bool:
        trial = copy.deepcopy(cfg)
        trial.data.seq_length = seq
        acts = activation_bytes(trial)
        return fixed_gib + (sum(acts["language_model"].values()) + acts["vision_model"] + acts["projector"]) / GIB \
            <= budget_gib

    low, high = 0, 1024  # in units of 1024 tokens: fits(low * 1024) holds, or low is 0
    while fits(high * 1024) and high < 2**14:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * 1024) else (low, mid)
    return {"tokens": low * 1024, "budget_gib": budget_gib,
            "checkpointing": cfg.model.kernels.activation_checkpointing}


def format_plan(plan: dict) -> str:
    p, mem = plan["params"], plan["memory_gib"]
    rows = [f"{plan['recipe']} (model {plan['model']})", f"{'part':<16}{'params':>18}  trainable"]
    for part in PARTS:
        rows.append(f"{part:<16}{p[part]:>18,}  {'yes' if plan['trainable_parts'][part] else 'no'}")
    rows.append(f"{'total':<16}{p['total']:>18,}  ({_short_count(p['total'])})")
    rows.append(f"{'trainable':<16}{p['trainable']:>18,}  ({_short_count(p['trainable'])})")
    lay = plan["layout"]
    rows.append(f"layout: {lay['world_size']} GPU{'s' if lay['world_size'] != 1 else ''} = data {lay['data']} x tensor {lay['tensor']}"
                f"{' (+SP)' if lay['sequence_parallel'] else ''} x context {lay['context']} x pipeline "
                f"{lay['pipeline']} ({lay['impl']}); optimizer sharding: {lay['data_parallel_sharding']}; "
                f"vision {lay['vision']}")
    rows.append(f"{'memory per GPU (GiB)':<16}{'':>14}")
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        rows.append(f"  {key:<14}{mem[key]:>18.2f}")
    acts = plan["activations_gib"]
    detail = ", ".join(f"{k} {v:.2f}" for k, v in acts["language_model"].items())
    rows.append(f"  activations: LM [{detail}], vision {acts['vision_model']:.2f}, projector {acts['projector']:.2f}")
    if plan["precision"].startswith("fp8"):
        names = plan["fp8_modules"]
        rows.append(f"{plan['precision']}: {len(names)} Linear modules in FP8 (plan.json lists them), "
                    f"e.g. {', '.join(names[:3])}")
    if "peft" in plan:
        pe = plan["peft"]
        rows.append(f"{pe['method']} rank {pe['rank']} on {pe['adapted_modules']} linears ({', '.join(pe['targets'])}): "
                    f"{_short_count(pe['adapter_params'])} adapter params + {_short_count(pe['trained_whole'])} "
                    f"trained whole; frozen base linears at {pe['frozen_base_bytes_per_param']} B/param, "
                    "no gradients or optimizer state")
    a = plan["assumptions"]
    rows.append(f"  assumes {a['compute_dtype']} compute, {a['optimizer_states']}, "
                f"{a['tokens_per_micro_batch']} tokens/micro-batch, checkpointing={a['activation_checkpointing']}")
    if "longest_context_one_gpu" in plan:
        lc = plan["longest_context_one_gpu"]
        if lc["tokens"]:
            rows.append(f"longest context on one GPU: {lc['tokens']:,} tokens per micro-batch row "
                        f"({lc['budget_gib']:.0f} GiB usable of 80 GB, checkpointing={lc['checkpointing']})")
        else:
            rows.append(f"longest context on one GPU: none (weights, gradients and optimizer alone exceed "
                        f"{lc['budget_gib']:.0f} GiB)")
    return "\n".join(rows)


def _short_count(n: int) -> str:
    """12,345,678,901 -> "12.35 B"; 287,216 -> "287.2 K": a size a reader takes in at a glance."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "B" else f"{n / scale:.1f} {unit}"
    return str(n)
