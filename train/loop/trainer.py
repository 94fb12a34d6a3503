"""Run one stage: build data, model and optimizer from the config, resume if possible, loop.

The loop itself (`Trainer.fit`) fits on one screen; building and bookkeeping live in helpers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from data_pipelines.training import special_tokens as st
from data_pipelines.training.loader import PackedBatchStream, build_batch_stream
from data_pipelines.training.samples import Tokenizer
from train.checkpoint.layout import NativeLayout, StateLayout
from train.checkpoint.store import (
    Checkpointer,
    CheckpointShapeError,
    find_latest,
    load_model_weights,
    load_newest_readable,
    read_data_states,
    read_marker,
    resolve_native_checkpoint,
)
from train.config.schema import MODEL_PARTS, Config, ConfigError
from train.loop.callbacks import MetricsFile, Progress, WandbLogger
from train.loop.preemption import Preempted, PreemptionHandler, mark_preempted
from train.loop.run_lock import hold_run_dir
from train.loop.train_module import TrainModule, apply_trainable, build_optimizer
from train.loop.validation import Validator
from train.model.vlm import VisionLanguageModel
from train.parallel.distributed import DistInfo, init_distributed, shutdown, sum_counts, wrap_data_parallel
from train.precision import build_precision
from train.reporting.report import write_stage_report


def prepare_data_files(cfg: Config) -> None:
    """Generate the embedded synthetic data when the recipe asks for it (smoke runs)."""
    if cfg.data.synth_dir is None:
        return
    from data_pipelines.tools.synth import ensure_embedded_data

    ensure_embedded_data(Path(cfg.data.synth_dir), seed=0, vocab_size=cfg.model.language_model.vocab_size)


def build_data(cfg: Config, tokenizer: Tokenizer, info: DistInfo) -> PackedBatchStream:
    return build_batch_stream(cfg.data, tokenizer, tokens_per_tile=cfg.model.tokens_per_tile, seed=cfg.seed,
                              micro_batch_size=cfg.trainer.micro_batch_size, rank=info.data_rank,
                              world_size=info.data_size, loss_weighting=cfg.trainer.loss_weighting)


def build_model(cfg: Config, tokenizer: Tokenizer, device: torch.device | None = None
                ) -> tuple[VisionLanguageModel, StateLayout, list[str]]:
    """The stage's model, initialised (seed, then `init.from_checkpoint`), with its checkpoint layout
    and the parts it leaves random (frozen and never loaded: what its checkpoints record).

    `model.impl=mcore` puts the language model on megatron-core (its groups set up by
    `init_distributed`, see `run_stage`); the vision tower and projector are the same modules on
    either engine."""
    if tokenizer.vocab_size > cfg.model.language_model.vocab_size:
        raise ConfigError(f"model.language_model.vocab_size={cfg.model.language_model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} tokens: raise it")
    engine: dict = {}
    layout: StateLayout = NativeLayout()
    if cfg.model.impl == "mcore":
        from train.model.mcore.loss import vocab_parallel_loss
        from train.model.mcore.model import McoreLanguageModel
        from train.model.mcore.state import McoreLayout

        device = device or torch.device("cpu")
        language_model = McoreLanguageModel(cfg.model.language_model, cfg.model.kernels, cfg.parallel, device,
                                            precision=cfg.precision)
        engine = {"language_model": language_model, "loss": vocab_parallel_loss(cfg.model.loss_chunk_size)}
        layout = McoreLayout(language_model)
    model = VisionLanguageModel(cfg.model, image_token_id=tokenizer.special_ids[st.IMG_CONTEXT],
                                image_end_id=tokenizer.special_ids[st.IMG_END], **engine)
    model.reset_parameters(cfg.seed)
    random_parts = list(MODEL_PARTS)
    if cfg.init.from_checkpoint:
        random_parts = load_init_weights(cfg, model, layout)
    check_random_parts(cfg, random_parts)
    apply_trainable(model, cfg.trainable)
    if not model.language_model.pre_process:
        # A later pipeline stage: the first one runs the media side. Dropped only now, so every rank
        # drew the same initial weights and made the same checks above.
        model.vision_model = model.projector = None
    return model, layout, sorted(set(random_parts) & set(cfg.trainable.frozen))


def load_init_weights(cfg: Config, model: VisionLanguageModel, layout: StateLayout) -> list[str]:
    """`init.from_checkpoint` (a step dir, or a run / checkpoints dir: its latest) into `model`;
    returns the parts still random. Another model size is a one-line error naming the tensor."""
    given = Path(cfg.init.from_checkpoint)
    try:
        checkpoint, run_dir = resolve_native_checkpoint(given)
    except FileNotFoundError as err:
        raise ConfigError(f"init.from_checkpoint={given}: {err}") from None
    try:
        return load_model_weights(checkpoint, model, layout)
    except CheckpointShapeError as err:
        saved_config = run_dir / "config.yaml"
        trained_as = yaml.safe_load(saved_config.read_text()).get("model", {}).get("name") if saved_config.exists() else None
        hint = f"it was trained with model={trained_as}: " if trained_as else ""
        raise ConfigError(f"init.from_checkpoint={checkpoint} is another model size ({err}); {hint}set the model group "
                          f"(model=...) or model.* sizes it was trained with (now model={cfg.model.name})") from None


def check_random_parts(cfg: Config, random_parts: list[str]) -> None:
    """A frozen part that was never loaded stays random for the whole stage: refuse to train
    around it unless `init.allow_random` names it."""
    refused = [part for part in cfg.trainable.frozen if part in random_parts and part not in cfg.init.allow_random]
    if refused:
        source = (f"init.from_checkpoint={cfg.init.from_checkpoint} holds no trained weights for them"
                  if cfg.init.from_checkpoint else "no init.from_checkpoint loads them")
        raise ConfigError(
            f"{', '.join(f'trainable.{p}=false' for p in refused)} but {source}: the stage would train around "
            f"random {' and '.join(refused)} weights. Start from a checkpoint that holds them (e.g. "
            f"`python -m train.convert compose --lm HF_LM --vision HF_RADIO --dst DIR`, then "
            f"init.from_checkpoint=DIR/checkpoints/step_0000000), or allow it: init.allow_random=[{','.join(refused)}]")


def use_deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True)` without the import of torch._inductor it makes
    only to set inductor's own flag (a second of every stage's start-up; nothing here is compiled):
    that flag is set too when inductor is already loaded."""
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None:  # another torch: the public call
        torch.use_deterministic_algorithms(True)
        return
    set_flag(True, warn_only=False)
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        inductor_config.deterministic = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        tokenizer = Tokenizer.load(cfg.data.tokenizer)
        self.precision = build_precision(cfg.precision, info.device, cfg.model.impl)
        model, self.layout, random_parts = build_model(cfg, tokenizer, info.device)
        # FP8 swaps Linear modules: before the optimizer (same Parameters either way) and DDP.
        self.model = self.precision.convert_model(model.to(info.device))
        if cfg.model.compile:  # after FP8 swapped its linears: the compiled blocks hold the final modules
            from train.model.compile import compile_blocks

            compile_blocks(self.model)
        # Wrap before the optimizer and the resume: FSDP2 turns parameters into DTensor shards.
        forward_module = wrap_data_parallel(self.model, cfg.parallel, info)
        shard_over = info.groups.get("data_context") if cfg.parallel.distributed_optimizer and info.groups else None
        self.optimizer = build_optimizer(self.model, cfg.optim, shard_over)
        if shard_over is not None:
            held = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
            total = sum(p.numel() for p in self.optimizer.all_params)
            self._log(f"optimizer state sharded over {info.gradient_replicas} ranks: rank 0 holds {held:,} of "
                      f"{total:,} parameters' moments")
        self.data = build_data(cfg, tokenizer, info)
        self.step, self.tokens = 0, 0
        precision_state = self.precision.state_dict()
        loaded = load_newest_readable(self.ckpt_root, self.model, self.optimizer, precision_state, self.layout)
        if loaded is not None:
            latest, saved = loaded
            self.precision.load_state_dict(precision_state)
            self.step, self.tokens = saved["step"], saved["tokens"]
            # One data position per data-parallel rank; the parallel layout may have changed since.
            data_states = read_data_states(latest)
            if len(data_states) == info.data_size:
                self.data.load_state_dict(data_states[info.data_rank])
            else:
                self.data.load_resharded(data_states)
                self._log(f"resharded the data position from {len(data_states)} to {info.data_size} ranks of data parallelism")
            self._log(f"resumed from {latest} at step {self.step}")
            self._note_schedule_change(read_marker(latest).get("max_steps"))
        self.train_module = TrainModule(forward_module, self.optimizer, cfg, info, self.precision)
        self.validator = Validator(cfg, tokenizer, info, self.precision)
        # Held-out rows are built now, not at the first evaluation: a missing, empty or unusable
        # held-out source stops the run before its first step instead of after eval_every steps.
        if self.validator.enabled:
            self.validator.sets()
        self.last_val: dict[str, float] = {}
        self.checkpointer = Checkpointer(self.ckpt_root, cfg.trainer.keep_last, cfg.trainer.async_save, self.layout,
                                         marker={"random_parts": random_parts, "max_steps": cfg.trainer.max_steps})

    def _note_schedule_change(self, saved_max_steps: int | None) -> None:
        """The schedule spans trainer.max_steps: resuming with another value reshapes the LR from here on."""
        now = self.cfg.trainer.max_steps
        if saved_max_steps is not None and saved_max_steps != now and self.cfg.optim.schedule != "constant":
            self._log(f"note: trainer.max_steps is {now}, the checkpoint was saved by a run of {saved_max_steps}: the "
                      f"{self.cfg.optim.schedule} learning-rate schedule now spans {now} steps, so from step "
                      f"{self.step + 1} on the LR differs from the interrupted run's")

    def _log(self, message: str) -> None:
        if self.info.is_main:
            print(f"[{self.cfg.stage}] {message}", flush=True)

    def fit(self, preemption: PreemptionHandler | None = None) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        metrics = MetricsFile(self.run_dir / "metrics.jsonl", self.step) if self.info.is_main else None
        progress = Progress(cfg.stage, self.step, t.max_steps, cfg.logger.progress_bar and self.info.is_main)
        wandb = WandbLogger(cfg.logger.wandb.mode, cfg.logger.wandb.project, cfg.logger.wandb.entity, self.run_dir,
                            cfg.stage, dataclasses.asdict(cfg)) if self.info.is_main else None
        own_handler = preemption is None
        preemption = PreemptionHandler(self.info.device).install() if own_handler else preemption
        try:
            last_loss = self._loop(metrics, progress, wandb, preemption)
            if not math.isfinite(last_loss) and metrics is not None and metrics.last_loss is not None:
                last_loss = metrics.last_loss  # resumed with no step left to run
            if not self.last_val and metrics is not None:
                self.last_val = metrics.last_val
            self.checkpointer.wait()
            summary = self._write_summary(last_loss)
            if self.info.is_main:
                self._write_report(wandb)
        finally:
            self.checkpointer.wait()  # an async save in flight completes (also on preemption)
            if own_handler:
                preemption.uninstall()
            progress.close()
            self.data.close()
            if wandb is not None:
                wandb.close()
        return summary

    def _write_report(self, wandb: WandbLogger) -> None:
        """report.html + plots in the run dir (and the plots in wandb). A report that cannot be
        drawn is a warning, never a failed stage: the training it describes is done and saved."""
        try:
            path, plots = write_stage_report(self.run_dir)
        except Exception as err:  # matplotlib / disk trouble must not fail a finished stage
            self._log(f"warning: report.html not written ({type(err).__name__}: {err}); "
                      f"rebuild it with `python -m train.report {self.run_dir}`")
            return
        self._log(f"report: {path}")
        wandb.log_images(plots, self.step)

    def _loop(self, metrics, progress, wandb, preemption: PreemptionHandler) -> float:
        cfg, t = self.cfg, self.cfg.trainer
        last_loss = float("nan")
        while self.step < t.max_steps:
            started = time.monotonic()
            result = self.train_module.train_step([self.data.next_batch() for _ in range(t.grad_accum_steps)], self.step)
            preemption.mark_stepped()
            self.step += 1
            self.tokens += result.real_tokens
            self.checkpointer.poll()  # an async save whose writes are done becomes `latest`
            if not result.skipped_nonfinite:
                last_loss = result.loss
            elapsed = time.monotonic() - started
            evaluate = self.validator.due(self.step)
            log_now = self.step % t.log_every == 0 or self.step == t.max_steps or evaluate
            per_source = self._per_source_counts() if log_now else {}  # collective: all ranks take part
            val = self.validator.evaluate(self.train_module.loss_sum) if evaluate else {}  # collective too
            if val:
                self.last_val = val
            if self.info.is_main and log_now:
                record = {
                    # JSON has no NaN: a skipped non-finite step logs loss and grad_norm as null.
                    "stage": cfg.stage, "step": self.step, "loss": _finite_or_none(result.loss), "lr": result.lr,
                    "tokens": self.tokens, "grad_norm": _finite_or_none(result.grad_norm), "step_time_s": elapsed,
                    "nonfinite_skipped": self.train_module.nonfinite_total,
                    "packing_efficiency": result.real_tokens / result.slots, "samples": result.samples,
                    "supervised_tokens": result.supervised_tokens, "epochs": round(self.data.epochs, 4),
                    **per_source, **result.precision_metrics, **val,
                }
                if result.evs_keep_ratio is not None:
                    record["evs_keep_ratio"] = result.evs_keep_ratio
                metrics.log(record)
                wandb.log(record)
                progress.update(self.step, result.loss, result.real_tokens / elapsed)
                if val:
                    self._log("val " + ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in val.items()))
            saved = self.step % t.save_every == 0 or self.step == t.max_steps
            if saved:
                self._save()
            if self.step < t.max_steps and preemption.should_stop():
                if not saved:
                    self._save()
                self.checkpointer.wait()
                self._log(f"preempted: saved step {self.step}; rerun the same command to resume")
                mark_preempted(f"saved step {self.step}")
                raise Preempted(self.step)
        return last_loss

    def _per_source_counts(self) -> dict:
        """Skips (per reason, and per source/reason), samples and tokens per source, all ranks summed."""
        d = self.data
        return {"skipped": sum_counts(d.skipped, self.info),
                "skipped_by_source": sum_counts(d.skipped_by_source, self.info),
                "samples_by_source": sum_counts(d.samples_by_source, self.info),
                "tokens_by_source": sum_counts(d.tokens_by_source, self.info),
                "fallbacks_by_source": sum_counts(d.fallbacks_by_source, self.info)}

    def _save(self) -> None:
        state = {"step": self.step, "tokens": self.tokens, "data_rank": self.info.data_rank, "data": self.data.state_dict()}
        self.checkpointer.save(self.step, self.model, self.optimizer, state, self.precision.state_dict())

    def _write_summary(self, last_loss: float) -> dict:
        latest = find_latest(self.ckpt_root)
        summary = {
            "stage": self.cfg.stage, "steps": self.step, "final_loss": _finite_or_none(last_loss),
            "tokens": self.tokens,
            "epochs": round(self.data.epochs, 4), **self._per_source_counts(),
            "val": {k.removeprefix("val/"): _finite_or_none(v) for k, v in self.last_val.items()},
            "checkpoint": str(latest) if latest else None,
        }
        if self.validator.enabled and self.last_val:
            summary["val_skipped"] = self.validator.skipped()
        if self.info.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._log(f"done: {self.step} steps, final loss {last_loss:.4f}, checkpoint {summary['checkpoint']}")
        return summary


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def stage_finished(cfg: Config) -> dict | None:
    """The summary of a finished stage in cfg.run.dir, or None when it still has steps to run."""
    path = Path(cfg.run.dir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == cfg.trainer.max_steps else None


def engine_groups(cfg: Config) -> dict:
    """How `init_distributed` sets up the groups: megatron-core builds its own (and needs a process
    group even for one process); the native engine takes the seam's."""
    if cfg.model.impl != "mcore":
        return {}
    from train.model.mcore.model import megatron_process_groups

    return {"always": True, "make_groups": functools.partial(megatron_process_groups, cfg.parallel)}


def run_stage(cfg: Config, preemption: PreemptionHandler | None = None) -> dict:
    """Train one stage to cfg.trainer.max_steps (resuming from the run dir when possible).
    `preemption`: an installed handler that outlives the stage (the pipeline's), else one for it.
    The run directory is held for the whole stage: a second trainer started on it is refused."""
    done = stage_finished(cfg)
    if done is not None:
        print(f"[{cfg.stage}] already finished ({done['steps']} steps) in {cfg.run.dir}; nothing to do", flush=True)
        return done
    with hold_run_dir(cfg.run.dir, rank=int(os.environ.get("RANK", "0"))):
        return _train_stage(cfg, preemption)


def _train_stage(cfg: Config, preemption: PreemptionHandler | None) -> dict:
    # Installed before anything slow (process groups, data generation, resume, data warm-up), so a
    # preemption or a kill during start-up stops the run at once (exit 75) instead of waiting.
    own_handler = preemption is None
    preemption = PreemptionHandler().install() if own_handler else preemption
    preemption.stepped = False
    try:
        info = init_distributed(cfg.parallel, cfg.trainer.device, **engine_groups(cfg))
    except BaseException:
        if own_handler:
            preemption.uninstall()
        raise
    preemption.device = info.device
    try:
        if info.is_main:
            prepare_data_files(cfg)
        if info.world_size > 1:
            torch.distributed.barrier()
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        if cfg.trainer.deterministic:
            if info.device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            use_deterministic_algorithms()
        seed_everything(cfg.seed + info.rank)
        summary = Trainer(cfg, info).fit(preemption)
    finally:
        if own_handler:
            preemption.uninstall()
        shutdown()
    if cfg.eval.tasks and info.is_main:
        summary = run_stage_benchmarks(cfg, summary)
    return summary


def run_stage_benchmarks(cfg: Config, summary: dict) -> dict:
    """`eval.tasks` on the stage's final checkpoint (rank 0, after training): results in
    summary.json and <run dir>/eval/."""
    from train.evaluation.harness import evaluate_checkpoint

    run_dir = Path(cfg.run.dir)
    print(f"[{cfg.stage}] lm-eval: {', '.join(cfg.eval.tasks)} on {summary['checkpoint']}", flush=True)
    out_file, report = evaluate_checkpoint(Path(summary["checkpoint"]), cfg.eval.tasks, run_dir / "eval",
                                           limit=cfg.eval.limit, device="cuda" if torch.cuda.is_available() else "cpu")
    summary = {**summary, "lm_eval": {"file": str(out_file), "results": report.get("results", {}),
                                     "skipped": report.get("skipped", {})}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
