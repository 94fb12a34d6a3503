"""Typed schema for a composed recipe, validated before any compute.

Hydra composes plain YAML; `load_config` turns the result into these dataclasses. Every
error names the dotted field and says what to set, so a bad override fails in a second
instead of after a model build.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

from data_pipelines.training.config import ConfigError, DataConfig, check_positive, paths_checked
from data_pipelines.training.special_tokens import MIN_TRAINED_VOCAB_SIZE
from train.ops.kernel_config import KernelConfig


@dataclass
class LanguageModelConfig:
    """Hybrid Mamba2 / attention / MLP decoder (Nemotron-H layout).

    `pattern` has one character per layer: `M` Mamba2 mixer, `*` attention, `-` MLP.
    """

    pattern: str = "M-M*M-M-"
    hidden_size: int = 64
    vocab_size: int = 1024
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    mamba_num_heads: int = 4
    mamba_head_dim: int = 16
    ssm_state_size: int = 16
    n_groups: int = 2
    conv_kernel: int = 4
    chunk_size: int = 16
    mlp_hidden_size: int = 128
    norm_eps: float = 1e-5
    # time_step_min / max / floor only shape the dt_bias initialisation; time_step_limit is the clamp
    # applied to the discretised step in training, prefill and decode (transformers' NemotronH and
    # megatron-core's MambaMixer, which trained the released checkpoints, default to (0, inf)).
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] = field(default_factory=lambda: [0.0, math.inf])
    initializer_range: float = 0.02

    def validate(self, path: str) -> None:
        check_positive(self, path, "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                       "chunk_size", "mlp_hidden_size")
        if len(self.time_step_limit) != 2 or not 0.0 <= self.time_step_limit[0] < self.time_step_limit[1]:
            raise ConfigError(f"{path}.time_step_limit={self.time_step_limit}: set [low, high] with 0 <= low < high "
                              "(the released models use [0.0, .inf])")
        bad = set(self.pattern) - set("M*-")
        if not self.pattern or bad:
            raise ConfigError(f"{path}.pattern={self.pattern!r}: use only 'M' (Mamba2), '*' (attention), '-' (MLP)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{path}.num_key_value_heads must divide num_attention_heads")
        if self.mamba_num_heads % self.n_groups:
            raise ConfigError(f"{path}.n_groups must divide mamba_num_heads")
        if self.mamba_intermediate_size % self.n_groups:
            raise ConfigError(f"{path}.n_groups must divide mamba_num_heads * mamba_head_dim")

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim


@dataclass
class VisionConfig:
    """ViT encoder over square tiles (RADIO-style, patch 16)."""

    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    normalization: str = "radio"
    # RADIO pieces (all off by default): learned class + register tokens prepended to the patches
    # (they attend with them, then are dropped), a position table sized for `max_image_size` tiles
    # that is bilinearly resized to the tile grid (CPE; 0 = a table for `image_size` exactly), and
    # no LayerNorm after the last block (`final_norm: false`).
    num_cls_tokens: int = 0
    num_registers: int = 0
    max_image_size: int = 0
    final_norm: bool = True
    # RADIO's per-channel layer scales on both residual branches (`layer_scale{1,2}.lambda1`).
    layer_scale: bool = False

    def validate(self, path: str) -> None:
        check_positive(self, path, "image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{path}.image_size must be a multiple of {path}.patch_size")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{path}.num_heads must divide {path}.hidden_size")
        if self.num_cls_tokens < 0 or self.num_registers < 0:
            raise ConfigError(f"{path}.num_cls_tokens and {path}.num_registers must be >= 0")
        if self.max_image_size < 0 or self.max_image_size % self.patch_size:
            raise ConfigError(f"{path}.max_image_size={self.max_image_size} must be 0 or a multiple of {path}.patch_size")

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    @property
    def pos_embed_side(self) -> int:
        return (self.max_image_size or self.image_size) // self.patch_size

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ProjectorConfig:
    """Pixel shuffle then an MLP from 4x the ViT width to the LM width."""

    downsample_ratio: float = 0.5
    hidden_size: int = 128


@dataclass
class ModelConfig:
    name: str = "tiny"
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    # "native": plain PyTorch (data parallel by DDP / FSDP2). "mcore": the language model built on
    # megatron-core for tensor, sequence, context and pipeline parallelism (`train.engines.mcore`).
    impl: Literal["native", "mcore"] = "native"
    # Rows of the output head and loss computed at once: full logits are never materialised.
    loss_chunk_size: int = 1024
    # torch.compile each language-model layer and vision block (`train.model.compile`): inductor
    # fuses the elementwise work between the reference ops. The first steps pay the compilation
    # (20-30 s on CPU in the benchmark); sample-boundary handling stays eager (graph breaks).
    compile: bool = False

    def validate(self, path: str) -> None:
        self.language_model.validate(f"{path}.language_model")
        self.vision.validate(f"{path}.vision")
        self.kernels.validate(f"{path}.kernels", self.language_model, f"{path}.language_model")
        side = self.vision.patches_per_side * self.projector.downsample_ratio
        if side != int(side) or side < 1:
            raise ConfigError(
                f"{path}.projector.downsample_ratio={self.projector.downsample_ratio} must turn the "
                f"{self.vision.patches_per_side}x{self.vision.patches_per_side} patch grid into a whole grid"
            )

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.vision.patches_per_side * self.projector.downsample_ratio)
        return side * side


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    # The schedule's floor as a fraction of lr, used while min_lr is 0: overriding optim.lr moves it along.
    min_lr_ratio: Optional[float] = None
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    clip_grad: float = 1.0

    def validate(self, path: str) -> None:
        check_positive(self, path, "lr")
        if self.min_lr_ratio is not None and not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{path}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{path}.min_lr={self.min_lr} must be in [0, {path}.lr={self.lr}]; or set "
                              f"{path}.min_lr_ratio to keep the floor a fraction of lr")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.clip_grad < 0:
            raise ConfigError(f"{path}: weight_decay, warmup_steps and clip_grad must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"{path}.beta1/beta2 must be in [0, 1)")

    @property
    def floor_lr(self) -> float:
        """Where the schedule ends: min_lr when set (> 0), else lr * min_lr_ratio (else 0)."""
        return self.min_lr if self.min_lr or self.min_lr_ratio is None else self.lr * self.min_lr_ratio


@dataclass
class TrainerConfig:
    max_steps: int = 100
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2
    # Write checkpoint shards in a background thread while training goes on (one CPU copy of the
    # state meanwhile); the checkpoint becomes `latest` when the write is done.
    async_save: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch's intra-op threads per process. 0: OMP_NUM_THREADS when set (torchrun sets 1 per rank),
    # else the cores this process may run on (its CPU affinity: a Slurm allocation, a container)
    # divided among the processes of this node. The stage's log says which it took.
    cpu_threads: int = 0
    deterministic: bool = True
    # Steps with a non-finite loss or gradient norm are skipped (no update); this many in a row
    # stop the run with an error, leaving the last good checkpoint as `latest`.
    max_nonfinite_steps: int = 5
    # Held-out evaluation (data.val_sources, data.monitor_sources): every `eval_every` steps (0: only
    # at the end of the stage), on the first `eval_samples` samples of each source.
    eval_every: int = 0
    eval_samples: int = 64
    # "token": every supervised token weighs the same (per-token mean over the global batch);
    # "sqrt_turn": each assistant turn weighs sqrt(its length) in total. Applied by the collator:
    # batches carry their targets' weights (`data_pipelines.training.batch.PackedBatch.target_weights`).
    loss_weighting: Literal["token", "sqrt_turn"] = "token"

    def validate(self, path: str) -> None:
        check_positive(self, path, "max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "save_every",
                        "keep_last", "max_nonfinite_steps", "eval_samples")
        if self.eval_every < 0:
            raise ConfigError(f"{path}.eval_every={self.eval_every}: set 0 (evaluate at the end only) or a step count")
        if self.cpu_threads < 0:
            raise ConfigError(f"{path}.cpu_threads={self.cpu_threads}: set 0 (automatic) or a thread count")


MODEL_PARTS = ("language_model", "vision_model", "projector")


@dataclass
class TrainableConfig:
    """Which parts receive gradients; the rest stay bit-identical."""

    language_model: bool = True
    vision_model: bool = False
    projector: bool = True

    @property
    def frozen(self) -> list[str]:
        return [part for part in MODEL_PARTS if not getattr(self, part)]

    def validate(self, path: str) -> None:
        if not (self.language_model or self.vision_model or self.projector):
            raise ConfigError(f"{path}: nothing would train; set at least one of language_model/vision_model/projector")


@dataclass
class InitConfig:
    # A checkpoint directory (checkpoints/step_N, or a run dir: its latest) whose model weights start this
    # stage, or a transformers Nemotron-H directory (config.json + safetensors), converted in memory.
    from_checkpoint: Optional[str] = None
    # Frozen parts allowed to stay at their random initialisation (smoke runs, ablations). Any other
    # frozen part whose weights were never loaded stops the stage before it trains.
    allow_random: list[str] = field(default_factory=list)
    # Smoke runs (data.synth_dir set): a stage that freezes the language model and names no
    # init.from_checkpoint starts it from the one pre-trained on the embedded data, built and cached
    # with it (train.loop.embedded_lm), as the real Stage 0 starts from a trained LM.
    embedded_lm: bool = False

    def validate(self, path: str) -> None:
        if self.from_checkpoint and paths_checked() and not Path(self.from_checkpoint).is_dir():
            raise ConfigError(f"{path}.from_checkpoint={self.from_checkpoint!r} is not a checkpoint directory")
        unknown = sorted(set(self.allow_random) - set(MODEL_PARTS))
        if unknown:
            raise ConfigError(f"{path}.allow_random names {unknown}: parts are {list(MODEL_PARTS)}")


# Modules kept out of FP8 by default: the embeddings, the output head, the whole vision side.
DEFAULT_FP8_KEEP_PATTERNS = ["language_model.backbone.embeddings", "language_model.lm_head", "vision_model",
                             "projector"]


@dataclass
class PrecisionConfig:
    """Numeric precision of a run; the fp8_* fields matter only for the two FP8 names.

    `fp8_delayed` runs the FP8 region through Transformer Engine; `fp8_delayed_emulated` runs the
    same delayed-scaling recipe in plain torch, on CPU or GPU, its GEMMs chosen by `fp8_gemm`.
    """

    name: Literal["fp32", "bf16", "fp8_delayed", "fp8_delayed_emulated"] = "fp32"
    # Dtype of everything outside the FP8 GEMMs. None: bf16 for bf16/fp8_delayed, fp32 otherwise.
    compute_dtype: Optional[Literal["fp32", "bf16"]] = None
    # hybrid: E4M3 forward (inputs, weights), E5M2 backward (output gradients); e4m3: E4M3 everywhere.
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    # scale = fp8_max / amax / 2**margin: headroom in powers of two.
    margin: int = 0
    # false: the weight-gradient GEMM uses the unquantised input and output gradient.
    fp8_wgrad: bool = True
    # fnmatch patterns over module names; a Linear matching one (or under a matching module) stays
    # out of FP8.
    keep_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_FP8_KEEP_PATTERNS))
    # The first and the last N language-model layers stay out of FP8.
    keep_first_last_layers: int = 1
    # The GEMMs of fp8_delayed_emulated on the quantised operands: `emulated` multiplies the FP8 values
    # in float32 (any device); `scaled_mm` runs real FP8 GEMMs through torch._scaled_mm (CUDA sm89+ or
    # CPU; FP8 Linears' in/out features multiples of 16, checked when the model is built).
    fp8_gemm: Literal["emulated", "scaled_mm"] = "emulated"

    @property
    def is_fp8(self) -> bool:
        return self.name.startswith("fp8")

    @property
    def resolved_compute_dtype(self) -> str:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return "bf16" if self.name in ("bf16", "fp8_delayed") else "fp32"

    def validate(self, path: str) -> None:
        if self.name in ("fp32", "bf16") and self.compute_dtype not in (None, self.name):
            raise ConfigError(f"{path}.compute_dtype={self.compute_dtype!r} contradicts {path}.name={self.name!r}: "
                              f"leave it unset or set it to {self.name!r}")
        if self.amax_history_len < 1:
            raise ConfigError(f"{path}.amax_history_len={self.amax_history_len} must be >= 1")
        if self.margin < 0:
            raise ConfigError(f"{path}.margin={self.margin} must be >= 0 (headroom in powers of two)")
        if self.keep_first_last_layers < 0:
            raise ConfigError(f"{path}.keep_first_last_layers={self.keep_first_last_layers} must be >= 0")
        for i, pattern in enumerate(self.keep_patterns):
            if not pattern.strip():
                raise ConfigError(f"{path}.keep_patterns[{i}] is empty: give an fnmatch pattern over module names")
        if self.is_fp8:
            # FP8 amax histories are reduced across ranks each step, which needs every rank to run the
            # same FP8 modules: the vision tower and projector do not run on text-only micro-batches.
            from fnmatch import fnmatchcase

            skipped = [m for m in ("vision_model", "projector")
                       if not any(fnmatchcase(m, p) for p in self.keep_patterns)]
            if skipped:
                raise ConfigError(f"{path}.keep_patterns must keep {skipped} out of FP8: they are skipped on "
                                  "text-only micro-batches, and the ranks' FP8 amax reductions would then disagree "
                                  "(add them back to precision.keep_patterns)")
        if self.fp8_gemm == "scaled_mm" and self.name != "fp8_delayed_emulated":
            raise ConfigError(
                f"{path}.fp8_gemm=scaled_mm chooses the GEMMs of precision=fp8_delayed_emulated, but {path}.name="
                f"{self.name!r}" + (" runs Transformer Engine's own FP8 GEMMs" if self.name == "fp8_delayed" else
                                    " has no FP8 GEMMs") + f": set {path}.fp8_gemm=emulated (the default) or "
                "precision=fp8_delayed_emulated")
        if self.name == "fp8_delayed" and not self.fp8_wgrad:
            raise ConfigError(
                f"{path}.fp8_wgrad=false: Transformer Engine >= 2.0 always runs the weight-gradient GEMM in FP8 "
                f"under delayed scaling; set {path}.fp8_wgrad=true or use precision=fp8_delayed_emulated"
            )


@dataclass
class ParallelConfig:
    """The parallel layout (`train.parallel.dims`): data parallelism takes the ranks left over by
    tensor x context x pipeline. Tensor, context and pipeline parallelism run on `model.impl=mcore`."""

    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    tensor_parallel: int = 1
    # Tensor-parallel activations split along the sequence between layers (megatron's sequence parallelism).
    sequence_parallel: bool = False
    context_parallel: int = 1
    pipeline_parallel: int = 1
    # Interleaved (virtual) pipeline stages: megatron-core 0.16.1 does not support them for the hybrid stack.
    virtual_pipeline_parallel: Optional[int] = None
    # Optimizer state (Adam m and v) sharded over the data (x context) parallel ranks, as megatron-core's
    # distributed optimizer does (`train.parallel.zero`); with data_parallel=ddp, either engine.
    distributed_optimizer: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def validate(self, path: str) -> None:
        check_positive(self, path, "tensor_parallel", "context_parallel", "pipeline_parallel")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError(f"{path}.sequence_parallel=true splits tensor-parallel activations: it needs "
                              f"{path}.tensor_parallel > 1")
        if self.virtual_pipeline_parallel is not None:
            raise ConfigError(f"{path}.virtual_pipeline_parallel={self.virtual_pipeline_parallel}: megatron-core "
                              "0.16.1 has no interleaved pipeline schedule for the hybrid Mamba stack; leave it null")

        if self.distributed_optimizer and self.data_parallel == "fsdp":
            raise ConfigError(f"{path}.distributed_optimizer=true with {path}.data_parallel=fsdp: FSDP already shards "
                              "the optimizer state; use data_parallel=ddp for the distributed optimizer")

    @property
    def model_parallel(self) -> bool:
        return self.tensor_parallel * self.context_parallel * self.pipeline_parallel > 1


# The linear layers an adapter can target, by role -> the native module names holding them (the last
# name component; the projector's are `projector.proj.0/2`). One role list serves every engine: the
# megatron-core engine's adapters (later) map the same roles onto linear_qkv / linear_proj /
# linear_fc1 / linear_fc2 / in_proj / out_proj.
ADAPTER_ROLES = {
    "attention_qkv": ("q_proj", "k_proj", "v_proj"),
    "attention_output": ("o_proj",),
    "mlp_up": ("up_proj",),
    "mlp_down": ("down_proj",),
    "mamba_in_proj": ("in_proj",),
    "mamba_out_proj": ("out_proj",),
    "projector": ("proj.0", "proj.2"),
}


@dataclass
class PeftConfig:
    """Low-rank adapters (`peft=lora|dora`; `peft=none`: full fine-tuning). The language model's and
    projector's targeted linears get adapters; their base weights stay frozen (no gradients, no
    optimizer state); the parts `trainable.*` leaves trainable and that hold no adapter train whole."""

    method: Literal["none", "lora", "dora"] = "none"
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank (PEFT's `lora_alpha`)
    dropout: float = 0.0
    # Roles of ADAPTER_ROLES; Megatron-Bridge's Nemotron-H LoRA recipe targets these four by default.
    targets: list[str] = field(default_factory=lambda: ["attention_qkv", "attention_output", "mlp_up", "mlp_down"])
    # PEFT's `init_lora_weights`: true = A Kaiming-uniform, B zeros (the adapted model starts equal to the base).
    init: Literal["default", "gaussian"] = "default"
    # compute: the frozen linears' weights are cast to the compute dtype (bf16 under precision=bf16: no
    # fp32 master copy of what never trains; unchanged under fp32); keep: left as built.
    base_dtype: Literal["compute", "keep"] = "compute"
    # How this stage takes an adapter run's checkpoint as init.from_checkpoint (the pipeline's hand-off):
    # merge: PEFT's merge into that run's base, then new adapters (or full training) on the merged model;
    # carry: the same base (with the parts that trained whole), that run's adapters trained on, so the
    # last stage leaves one adapter over the original base (what a LoRA server loads beside it).
    handoff: Literal["merge", "carry"] = "merge"

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self, path: str) -> None:
        if not self.enabled:
            return
        if self.rank < 1:
            raise ConfigError(f"{path}.rank={self.rank}: set a positive rank (e.g. 16)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout={self.dropout}: set a probability in [0, 1)")
        unknown = [t for t in self.targets if t not in ADAPTER_ROLES]
        if unknown or not self.targets:
            raise ConfigError(f"{path}.targets={self.targets}: choose roles from {list(ADAPTER_ROLES)}")


@dataclass
class WandbConfig:
    # offline: files under <run dir>/wandb/ (`wandb sync` uploads them later); online: needs
    # WANDB_API_KEY in the environment (never in config or logs).
    mode: Literal["disabled", "offline", "online"] = "offline"
    project: str = "hybrid-vl-sft"
    entity: Optional[str] = None  # the wandb team or user; None: the API key's default entity


@dataclass
class LoggerConfig:
    """Where each logged step goes besides metrics.jsonl (always written). wandb and TensorBoard are
    independent: either, both or neither (`logger=wandb_offline|tensorboard|none`, or the fields)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False  # event files in <run dir>/tensorboard/ (`tensorboard --logdir <run dir>`)
    progress_bar: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class EvalConfig:
    """Benchmarks run on the stage's final checkpoint when it finishes (`train.evaluate --tasks`)."""

    # EleutherAI lm-eval task names or task YAML paths; results in summary.json and <run dir>/eval/.
    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None  # documents per task (None: all), for tasks and vlm_tasks
    # Vision-language lm-eval tasks (chartqa, mmmu_val, docvqa_val, ...) on the stage's VLM, prompted
    # as training prompts (`train.evaluate --vlm-tasks`); results in summary.json ("vlm_eval") and
    # the reports' benchmark-by-stage table.
    vlm_tasks: list[str] = field(default_factory=list)
    vlm_data_dir: Optional[str] = None  # local copies of the tasks' Hub datasets at DIR/<repo id> (offline)
    vlm_think: bool = False  # reasoning mode (/think) for the vlm tasks
    vlm_batch_size: int = 1  # prompts decoded together (any lengths: none is padded)
    vlm_max_new_tokens: Optional[int] = None  # a cap on every task's answer length (None: each task's own)

    def validate(self, path: str) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{path}.limit={self.limit}: set a positive count or null")
        for task in self.tasks + self.vlm_tasks:
            if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
                raise ConfigError(f"{path}.tasks: task file {task} does not exist")
        if self.vlm_data_dir is not None and not Path(self.vlm_data_dir).is_dir():
            raise ConfigError(f"{path}.vlm_data_dir={self.vlm_data_dir}: no such directory (it holds the local "
                              "copies of the vlm tasks' datasets, at DIR/<hub repo id>)")
        if self.vlm_batch_size < 1:
            raise ConfigError(f"{path}.vlm_batch_size={self.vlm_batch_size}: set a positive count")
        if self.vlm_max_new_tokens is not None and self.vlm_max_new_tokens < 1:
            raise ConfigError(f"{path}.vlm_max_new_tokens={self.vlm_max_new_tokens}: set a positive count or null")


@dataclass
class Config:
    stage: str = ""
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    init: InitConfig = field(default_factory=InitConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    # Name of the smoke overlay in use (None for a real run); informational.
    smoke: Optional[str] = None

    def validate(self, engine_rules: Callable[["Config"], None] | None = None) -> "Config":
        """Every engine-blind rule; `engine_rules`: the chosen engine's own (`Engine.validate`, passed in
        by `train.config.compose.load_config`: the schema does not know the engines)."""
        if not self.stage:
            raise ConfigError("stage is empty: a recipe must set `stage` to its own name")
        for name in ("model", "data", "optim", "trainer", "trainable", "init", "parallel", "precision", "eval", "peft"):
            getattr(self, name).validate(name)
        self.model.kernels.validate_runtime("model.kernels", self.trainer.device, self.precision)
        if engine_rules is not None:
            engine_rules(self)
        if self.precision.name == "fp8_delayed":
            self._validate_fp8_shapes()
        vocab = self.model.language_model.vocab_size
        if self.data.synth_dir is not None and vocab < MIN_TRAINED_VOCAB_SIZE:
            raise ConfigError(f"model.language_model.vocab_size={vocab} is too small for the embedded data's tokenizer "
                              f"(trained to this size): set it to at least {MIN_TRAINED_VOCAB_SIZE}")
        if self.data.tile_size != self.model.vision.image_size:
            raise ConfigError(
                f"data.tile_size={self.data.tile_size} differs from model.vision.image_size="
                f"{self.model.vision.image_size}: set them equal"
            )
        return self

    def _validate_fp8_shapes(self) -> None:
        """Transformer Engine's FP8 GEMMs need every dimension a multiple of 16, the tokens of a
        micro-batch included."""
        lm = self.model.language_model
        dims = {"hidden_size": lm.hidden_size, "mlp_hidden_size": lm.mlp_hidden_size,
                "num_attention_heads * head_dim": lm.num_attention_heads * lm.head_dim,
                "num_key_value_heads * head_dim": lm.num_key_value_heads * lm.head_dim,
                "mamba_num_heads * mamba_head_dim": lm.mamba_intermediate_size,
                "in_proj width": 2 * lm.mamba_intermediate_size + 2 * lm.n_groups * lm.ssm_state_size
                + lm.mamba_num_heads}
        bad = {name: value for name, value in dims.items() if value % 16}
        if bad:
            raise ConfigError(f"precision=fp8_delayed runs Transformer Engine FP8 GEMMs, which need multiples of 16: "
                              f"model.language_model has {bad}; change them or use precision=bf16")
        tokens = self.trainer.micro_batch_size * self.data.seq_length
        if tokens % 16:
            raise ConfigError(f"precision=fp8_delayed needs the tokens of a micro-batch (trainer.micro_batch_size x "
                              f"data.seq_length = {tokens}) to be a multiple of 16")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, rejecting unknown fields and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown field {where}{unknown[0]}; valid fields are: {', '.join(sorted(known))}")
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, path)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{path}={value!r}: choose one of {list(get_args(hint))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    return value


def build_config(raw: dict, engine_rules_of: Callable[[str], Callable[[Config], None]] | None = None) -> Config:
    """Typed, validated config from a resolved plain dict (Hydra's output); `engine_rules_of(impl)`:
    the rules of the engine `model.impl` names."""
    cfg = from_dict(Config, raw)
    return cfg.validate(engine_rules_of(cfg.model.impl) if engine_rules_of is not None else None)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


