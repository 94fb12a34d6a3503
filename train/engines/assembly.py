"""Build a stage's model, precision, parallel wrapping and optimizer in one fixed order, for every
user: the trainer, `train.plan --measure`, and chat / evaluation (which load trained weights).

    1. model            the engine's language model + the shared vision tower and projector
    2. initial weights  seeded init then `init.from_checkpoint` (native, or a transformers directory
                        converted on the fly), or a trained checkpoint (`weights_from`)
       adapters         `peft`: the engine wraps the targeted linears (on the loaded base, whose
                        fingerprint the checkpoints record); checkpoints then hold trainable tensors only
    3. trainable parts  `trainable.*` (requires_grad; a part with adapters trains those only); frozen
                        linears to the compute dtype under `peft`; a later pipeline stage drops the media side
    4. device
    5. precision        the plugin converts the model (FP8 swaps linears: before the optimizer and DDP)
    6. compile          after the FP8 swap, so the compiled blocks hold the final modules
    7. parallelize      DDP / FSDP2 (FSDP2 turns parameters into DTensor shards: before the optimizer)
    8. optimizer        AdamW over the trainable parameters (sharded with parallel.distributed_optimizer)
    9. resume           the newest readable checkpoint of the run (training only)

torchtitan's `parallelize_llama` is the model: every step in one place, each once.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import yaml
from torch import nn

from data_pipelines.training import special_tokens as st
from train.checkpoint.files import find_latest, read_marker
from train.checkpoint.layout import NativeLayout, StateLayout
from train.checkpoint.store import (
    CheckpointShapeError,
    load_model_tensors,
    load_adapter_tensors,
    load_model_weights,
    load_newest_readable,
    load_trainable_weights,
    resolve_native_checkpoint,
)
from train.config.schema import (
    MODEL_PARTS,
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainableConfig,
    from_dict,
)
from train.engines import Engine, resolve_engine
from train.model.vlm import VisionLanguageModel
from train.parallel.distributed import DistInfo
from train.parallel.zero import ShardedAdamW
from train.precision import Precision


@dataclass
class Assembled:
    engine: Engine
    model: VisionLanguageModel  # unwrapped, converted: what checkpoints and precision see
    forward_module: nn.Module  # what a step calls: `model` or its data-parallel wrapper
    layout: StateLayout
    precision: Precision
    # The parts left random (frozen and never loaded): what the stage's checkpoints record.
    random_parts: list[str]
    optimizer: torch.optim.Optimizer | None = None
    # Resumed: (the checkpoint, its saved counters); None for a fresh start.
    resumed: tuple[Path, dict] | None = None
    # `peft`: what the checkpoints record about the adapters and their base (None: full fine-tuning).
    adapters: dict | None = None


def assemble(cfg: Config, info: DistInfo, special_ids: Mapping[str, int], *, train: bool = True,
             weights_from: Path | None = None, resume_from: Path | None = None,
             log: Callable[[str], None] = print) -> Assembled:
    """Steps 1-9 above. `special_ids`: the tokenizer's ids of the media tokens. `train=False` stops
    after step 7 (no optimizer, no resume). `weights_from`: a native checkpoint to start from instead
    of the seeded init and `init.from_checkpoint` (chat, evaluation): the model is then built on the
    device directly. `resume_from`: the run's checkpoints directory."""
    engine = resolve_engine(cfg.model.impl)
    # 1. model (built where it runs when its weights are loaded, not drawn: no host copy of a large model)
    with torch.device(info.device) if weights_from is not None else contextlib.nullcontext():
        model = VisionLanguageModel(cfg.model, image_token_id=special_ids[st.IMG_CONTEXT],
                                    image_end_id=special_ids.get(st.IMG_END),
                                    **engine.build_language_model(cfg, info.device))
    layout = engine.state_layout(model)
    # 2. initial weights
    if weights_from is not None:
        if read_marker(weights_from).get("adapters"):  # an adapter run's: its base with the adapters merged
            _, merged, _ = merged_adapter_weights(weights_from, log=log if info.is_main else _quiet)
            layout.load_model_state(model, merged)
        else:
            load_model_weights(weights_from, model, layout)
        random_parts: list[str] = []
    else:
        model.reset_parameters(cfg.seed)
        random_parts = list(MODEL_PARTS)
        if cfg.init.from_checkpoint:
            random_parts = load_init_weights(cfg, model, layout, log if info.is_main else _quiet)
        check_random_parts(cfg, random_parts)
    # 2b. adapters, on the loaded base (trained weights to use, `weights_from`, come merged: none to put on)
    adapters = None
    if cfg.peft.enabled and weights_from is None:
        from train.engines.native.adapters import is_adapter_param, mark_trainable

        adapters = {"method": cfg.peft.method, "base": cfg.init.from_checkpoint,
                    "base_fingerprint": engine.base_fingerprint(model)}
        adapters["modules"] = engine.apply_adapters(model, cfg)
        if adapters["modules"]:
            layout = engine.adapter_layout(model)
            carried_from = carried_adapters(cfg)
            if carried_from is not None:  # the previous stage's adapters, not fresh ones
                fresh = load_adapter_tensors(carried_from, model, layout, is_adapter_param)
                if fresh:
                    (log if info.is_main else _quiet)(f"peft.handoff=carry: {len(fresh)} adapter tensors of this stage's "
                                                       f"targets are not in {carried_from} and start fresh")
        else:  # no targeted linear in a trainable part (Stage 0 trains the projector alone): train as configured
            if carried_adapters(cfg) is not None:
                raise ConfigError(f"peft.handoff=carry: this stage's trainable parts hold none of peft.targets="
                                  f"{cfg.peft.targets}, so {cfg.init.from_checkpoint}'s adapters would be dropped: "
                                  "set peft.handoff=merge")
            (log if info.is_main else _quiet)(f"peft={cfg.peft.method}: peft.targets={cfg.peft.targets} name no linear "
                                               "of a trainable part; this stage trains its trainable parts whole")
            adapters = None
    # 3. trainable parts
    apply_trainable(model, cfg.trainable)
    if adapters is not None:
        mark_trainable(model, cfg.trainable, adapters["modules"])
        if cfg.peft.base_dtype == "compute" and cfg.precision.resolved_compute_dtype == "bf16":
            engine.cast_frozen_base(model, torch.bfloat16)
    if not model.language_model.pre_process:
        # A later pipeline stage: the first one runs the media side. Dropped only now, so every rank
        # drew the same initial weights and made the same checks above.
        model.vision_model = model.projector = None
    # 4. device, 5. precision
    precision = engine.build_precision(cfg.precision, info.device)
    model = precision.convert_model(model.to(info.device))
    # 6. compile
    if cfg.model.compile:
        from train.model.compile import compile_blocks

        compile_blocks(model)
    # 7. parallelize
    forward_module = engine.parallelize(model, cfg, info)
    assembled = Assembled(engine, model, forward_module, layout, precision,
                          sorted(set(random_parts) & set(cfg.trainable.frozen)), adapters=adapters)
    if not train:
        return assembled
    # 8. optimizer
    shard_over = info.groups.get("data_context") if cfg.parallel.distributed_optimizer and info.groups else None
    assembled.optimizer = build_optimizer(model, cfg.optim, shard_over)
    if shard_over is not None:
        held = sum(p.numel() for g in assembled.optimizer.param_groups for p in g["params"])
        total = sum(p.numel() for p in assembled.optimizer.all_params)
        log(f"optimizer state sharded over {info.gradient_replicas} ranks: rank 0 holds {held:,} of {total:,} "
            "parameters' moments")
    # 9. resume
    if resume_from is not None:
        if adapters is not None:
            check_adapter_base(resume_from, adapters)
        precision_state = precision.state_dict()
        assembled.resumed = load_newest_readable(resume_from, model, assembled.optimizer, precision_state, layout)
        if assembled.resumed is not None:
            precision.load_state_dict(precision_state)
    return assembled


def check_adapter_base(checkpoints: Path, adapters: dict) -> None:
    """An adapter checkpoint holds no base: resuming it on another base would train adapters made for
    one model on another. Refuse unless the base's fingerprint matches the one the checkpoint recorded."""
    latest = find_latest(checkpoints)
    if latest is None:
        return
    saved = read_marker(latest).get("adapters")
    if saved is None:
        raise ConfigError(f"{latest} was written by full fine-tuning (peft=none); this run has peft={adapters['method']}: "
                          "set peft=none to resume it, or start a new run.dir")
    if saved.get("base_fingerprint") != adapters["base_fingerprint"]:
        raise ConfigError(f"{latest} holds adapters trained on another base (init.from_checkpoint={saved.get('base')}, "
                          f"fingerprint {saved.get('base_fingerprint')}); this run's base "
                          f"(init.from_checkpoint={adapters['base']}) has fingerprint {adapters['base_fingerprint']}: "
                          "restore that base, or start a new run.dir")


def load_init_weights(cfg: Config, model: VisionLanguageModel, layout: StateLayout,
                      log: Callable[[str], None] = print) -> list[str]:
    """`init.from_checkpoint` (a step dir, or a run / checkpoints dir: its latest; or a transformers
    Nemotron-H directory) into `model`; returns the parts still random. Another model size is a
    one-line error naming the tensor."""
    given = Path(cfg.init.from_checkpoint)
    if is_transformers_dir(given):
        return load_hf_init_weights(cfg, given, model, layout, log)
    try:
        checkpoint, run_dir = resolve_native_checkpoint(given)
    except FileNotFoundError as err:
        raise ConfigError(f"init.from_checkpoint={given}: {err}") from None
    if read_marker(checkpoint).get("adapters"):
        if carried_adapters(cfg) is not None:
            return load_carried_base(checkpoint, model, layout, log)
        return load_merged_adapter_weights(checkpoint, model, layout, log)
    try:
        return load_model_weights(checkpoint, model, layout)
    except CheckpointShapeError as err:
        raise ConfigError(f"init.from_checkpoint={checkpoint} is another model size ({err}); "
                          f"{size_mismatch_fix(cfg.model, run_dir)}") from None


# The model groups `model=NAME` can choose (train.config.compose.CONFIGS_DIR, without importing Hydra here).
MODEL_GROUP_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
# What `train.convert compose` sets of the projector, by its flag (the LM and ViT come from the sources).
COMPOSE_FLAGS = {"projector.hidden_size": "--projector-hidden-size", "projector.downsample_ratio": "--downsample-ratio"}


def size_mismatch_fix(model: ModelConfig, run_dir: Path) -> str:
    """What to set when a native checkpoint from `run_dir` does not fit `model`: the model group it
    was trained with (only when `configs/model/<name>.yaml` exists: a converted or composed
    checkpoint is named after its sources), the model.* fields its config.yaml gives otherwise, and
    for a `train.convert compose` output whose projector differs, the compose flag that remakes it."""
    from train.hf.compose import VISION_CONFIG_NAME  # here: compose reads transformers configs
    from train.hf.config import model_config_differences
    from train.hf.files import SOURCE_DIR

    now = f"(now model={model.name})"
    saved_file = run_dir / "config.yaml"
    saved = (yaml.safe_load(saved_file.read_text()) or {}).get("model") if saved_file.exists() else None
    if not isinstance(saved, dict):
        return f"set the model group (model=...) or the model.* sizes it was trained with {now}"
    name = saved.get("name")
    group = f"model={name}" if name and (MODEL_GROUP_DIR / f"{name}.yaml").is_file() else None
    try:
        differ = model_config_differences(model, from_dict(ModelConfig, saved, "model"), "vl")
    except ConfigError:  # a config.yaml of an older schema: its fields are not comparable one by one
        differ = []
    composed = (run_dir / SOURCE_DIR / VISION_CONFIG_NAME).is_file()
    remade = [(field, mine, theirs) for field, mine, theirs in differ if field in COMPOSE_FLAGS]
    if composed and remade:
        flags = " ".join(f"{COMPOSE_FLAGS[field]} {mine}" for field, mine, _ in remade)
        theirs = " ".join(f"model.{field}={value}" for field, _, value in remade)
        rest = [f"model.{field}={value}" for field, _, value in differ if field not in COMPOSE_FLAGS]
        also = f" (and set {' '.join(rest)})" if rest else ""
        return (f"it was made by `train.convert compose` with {theirs}: rerun compose with {flags} for this "
                f"recipe{also}, or set {' '.join([theirs, *rest])} {now}")
    if differ:
        fields = "; ".join(f"model.{field}={mine!r} here, {theirs!r} there" for field, mine, theirs in differ)
        option = f"set {group}, or " if group else "set "
        return f"its config.yaml describes another model ({fields}): {option}those model.* fields to its values {now}"
    if group:
        return f"it was trained with {group}: set it {now}"
    return f"set the model.* sizes it was trained with {now}"


def load_merged_adapter_weights(checkpoint: Path, model: VisionLanguageModel, layout: StateLayout,
                                log: Callable[[str], None]) -> list[str]:
    """The stage hand-off from an adapter run (`peft`): its checkpoint holds adapters, not a model, so
    its base is rebuilt (that run's own `init.from_checkpoint`, checked against the recorded fingerprint),
    the adapters merged into it (PEFT's merge) and the merged weights loaded: this stage starts from the
    model the previous one trained, whether it trains adapters again or the whole model."""
    _, merged, _ = merged_adapter_weights(checkpoint, log=log)
    layout.load_model_state(model, merged)
    log(f"init.from_checkpoint: merged the {read_marker(checkpoint)['adapters']['method']} adapters of {checkpoint} "
        "into their base")
    return sorted(read_marker(checkpoint).get("random_parts", []))


def carried_adapters(cfg: Config) -> Path | None:
    """The adapter checkpoint whose adapters this stage trains on (`peft.handoff=carry` with
    init.from_checkpoint naming an adapter run), or None. That run's method, rank and alpha must be
    this stage's: its adapters are loaded as they are."""
    if not (cfg.peft.enabled and cfg.peft.handoff == "carry" and cfg.init.from_checkpoint):
        return None
    given = Path(cfg.init.from_checkpoint)
    if is_transformers_dir(given):
        return None
    checkpoint, run_dir = resolve_native_checkpoint(given)
    if not read_marker(checkpoint).get("adapters"):
        return None
    from train.checkpoint.files import read_run_config

    theirs = read_run_config(run_dir).peft
    differ = [f"peft.{f}={getattr(cfg.peft, f)!r} here, {getattr(theirs, f)!r} there" for f in ("method", "rank", "alpha")
              if getattr(cfg.peft, f) != getattr(theirs, f)]
    if differ:
        raise ConfigError(f"peft.handoff=carry: {checkpoint}'s adapters are another shape ({'; '.join(differ)}): set "
                          "those fields to its values, or peft.handoff=merge")
    return checkpoint


def load_carried_base(checkpoint: Path, model: VisionLanguageModel, layout: StateLayout,
                      log: Callable[[str], None]) -> list[str]:
    """`peft.handoff=carry`: the base an adapter run trained on, with the parts it trained whole (the
    projector of Stage 1), unmerged; its adapters are put on in the assembly's step 2b."""
    from train.engines.native.adapters import unload_adapters

    _, adapted, _ = load_adapted_model(checkpoint, log=_quiet)  # (earlier stages' carries: one line is enough)
    layout.load_model_state(model, unload_adapters(adapted, merge=False).state_dict())
    log(f"init.from_checkpoint: the base of {checkpoint}, its {read_marker(checkpoint)['adapters']['method']} adapters "
        "carried on (peft.handoff=carry)")
    return sorted(read_marker(checkpoint).get("random_parts", []))


def merged_adapter_weights(checkpoint: Path, base: str | None = None, log: Callable[[str], None] = print
                           ) -> tuple[Config, dict[str, torch.Tensor], Path]:
    """(run config, native state, run dir) of an adapter run's checkpoint with its adapters merged into
    its base in memory (`load_adapted_model`, PEFT's merge): the model that run trained, for the stage
    hand-off, chat, evaluation and `train.api`, whichever engine wrote the adapters."""
    from train.engines.native.adapters import unload_adapters

    cfg, adapted, run_dir = load_adapted_model(checkpoint, base, log=log)
    return cfg, unload_adapters(adapted, merge=True).state_dict(), run_dir


def is_transformers_dir(path: Path) -> bool:
    """A directory `save_pretrained` wrote (native run and step directories hold no config.json)."""
    return (Path(path) / "config.json").is_file()


def load_hf_init_weights(cfg: Config, hf_dir: Path, model: VisionLanguageModel, layout: StateLayout,
                         log: Callable[[str], None]) -> list[str]:
    """A transformers `nemotron_h` / `nemotron_h_omni` directory converted in memory as
    `train.convert hf-to-native` would (nothing written), then loaded as its native checkpoint would
    be. Its config.json must describe `cfg.model`: checked field by field before any tensor is read."""
    # Imported here: transformers and safetensors, which native starts never need.
    from train.hf.config import model_config_differences
    from train.hf.conversion import open_hf_as_native
    from train.hf.errors import ConversionError

    given = f"init.from_checkpoint={hf_dir}"
    try:
        with open_hf_as_native(hf_dir) as hf:
            differ = model_config_differences(cfg.model, hf.model_config, hf.layout)
            if differ:
                fields = "; ".join(f"model.{name}={mine!r} here, {theirs!r} there" for name, mine, theirs in differ)
                raise ConfigError(f"{given}: its config.json describes another model ({fields}); set the model group "
                                  f"(model=...) or those model.* fields to its values (now model={cfg.model.name})")
            with warnings.catch_warnings():  # the parts it lacks: said once below, on rank 0 only
                warnings.filterwarnings("ignore", message=r".* holds no weights for .*keep their initialisation")
                random_parts = load_model_tensors(hf_dir, hf.shapes, hf.read, model, layout)
    except ConversionError as err:
        raise ConfigError(f"{given}: {err}") from None
    except CheckpointShapeError as err:
        raise ConfigError(f"{given} is another model size ({err}); set the model group (model=...) or model.* sizes "
                          f"its config.json describes (now model={cfg.model.name})") from None
    kind = {"lm": "a language model, nemotron_h", "vl": "a vision-language model, nemotron_h_omni"}[hf.layout]
    still = f"; {' and '.join(random_parts)} stay random" if random_parts else ""
    log(f"init.from_checkpoint: converted the transformers checkpoint {hf_dir} ({kind}) to the native layout on the "
        f"fly, in memory{still}")
    return random_parts


def _quiet(message: str) -> None:
    """The log of every rank but the first."""


def check_random_parts(cfg: Config, random_parts: list[str]) -> None:
    """A frozen part that was never loaded stays random for the whole stage: refuse to train
    around it unless `init.allow_random` names it."""
    refused = [part for part in cfg.trainable.frozen if part in random_parts and part not in cfg.init.allow_random]
    if refused:
        given = cfg.init.from_checkpoint
        hf_lm = given and is_transformers_dir(Path(given))
        if hf_lm:  # only a language model's directory leaves parts out (an omni one holds all three)
            source = f"init.from_checkpoint={given} is a transformers language model, with no weights for them"
        elif given:
            source = f"init.from_checkpoint={given} holds no trained weights for them"
        else:
            source = "no init.from_checkpoint loads them"
        raise ConfigError(
            f"{', '.join(f'trainable.{p}=false' for p in refused)} but {source}: the stage would train around "
            f"random {' and '.join(refused)} weights. Start from a checkpoint that holds them (e.g. "
            f"`python -m train.convert compose --lm {given if hf_lm else 'HF_LM'} --vision HF_RADIO --dst DIR`, then "
            f"init.from_checkpoint=DIR/checkpoints/step_0000000), or allow it: init.allow_random=[{','.join(refused)}]")


def apply_trainable(model: VisionLanguageModel, trainable: TrainableConfig) -> None:
    for part, flag in (("language_model", trainable.language_model), ("vision_model", trainable.vision_model),
                       ("projector", trainable.projector)):
        getattr(model, part).requires_grad_(flag)


def build_optimizer(model: nn.Module, cfg: OptimConfig, shard_over=None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with `shard_over` (a process group) its state is sharded
    over that group's ranks (`train.parallel.zero.ShardedAdamW`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on norms, biases and 1-d SSM parameters (A_log, D, dt_bias).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if shard_over is not None:
        return ShardedAdamW(groups, shard_over, **hyper)
    return torch.optim.AdamW(groups, **hyper)


def load_adapted_model(src: Path, base: str | None = None, log=print):
    """(run config, the adapted native model in fp32, run dir) of an adapter run's checkpoint `src` (a run
    dir, its checkpoints/ or a step dir): its base rebuilt as the run built it (seeded init, then
    `init.from_checkpoint`, or `base` instead), checked against the fingerprint the checkpoint recorded,
    the adapters put on and their trained tensors (with the parts that trained whole) loaded."""
    from train.checkpoint.files import read_marker, read_run_config, resolve_native_checkpoint
    from train.engines.native.adapters import apply_adapters, base_fingerprint, mark_trainable

    checkpoint, run_dir = resolve_native_checkpoint(Path(src))
    saved = read_marker(checkpoint).get("adapters")
    if saved is None:
        raise ConfigError(f"{checkpoint} holds no adapters (its run had peft=none): export it without --adapters/--merge")
    cfg = read_run_config(run_dir)
    if base is not None:
        cfg.init.from_checkpoint = str(base)
    model = VisionLanguageModel(cfg.model, image_token_id=0)  # the token id plays no part in the weights
    model.reset_parameters(cfg.seed)
    if cfg.init.from_checkpoint:
        load_init_weights(cfg, model, NativeLayout(), log)
    found = base_fingerprint(model.state_dict())
    if found != saved["base_fingerprint"]:
        raise ConfigError(f"the base (init.from_checkpoint={cfg.init.from_checkpoint}) has fingerprint {found}, but "
                          f"{checkpoint}'s adapters were trained on {saved.get('base')} (fingerprint "
                          f"{saved['base_fingerprint']}): pass that base with --base")
    apply_adapters(model, cfg.peft, cfg.trainable, cfg.seed)
    mark_trainable(model, cfg.trainable, saved["modules"])
    load_trainable_weights(checkpoint, model)
    return cfg, model.eval(), run_dir
