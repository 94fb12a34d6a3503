"""Run one stage: data, then the stage assembled (`assembly.assemble`: model, precision, parallel
wrapping, optimizer, resume), then the loop.

The loop (`Trainer._loop`) runs the step and its collectives, then the callbacks (`callbacks`:
validation, metrics, wandb, TensorBoard, progress, checkpointing and preemption), and fits on half a screen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_pipelines.training.loader import PackedBatchStream, build_batch_stream
from data_pipelines.training.samples import Tokenizer
from train.checkpoint.files import find_latest, read_marker, write_run_config
from train.checkpoint.store import Checkpointer, read_data_states
from train.config.schema import Config, ConfigError
from train.engines import resolve_engine
from train.evaluate.heldout import Validator
from train.engines.assembly import assemble
from train.loop import embedded_lm
from train.loop.callbacks import (
    Callback,
    Checkpointing,
    MetricsFile,
    Progress,
    StepEnd,
    TensorBoardLogger,
    Validation,
    WandbLogger,
    check_logger_packages,
)
from train.loop.preemption import PreemptionHandler
from train.loop.run_lock import hold_run_dir
from train.loop.train_module import StepResult, TrainModule
from train.parallel.distributed import DistInfo, barrier, shutdown, sum_count_tables
from train.report.build import write_stage_report


def prepare_data_files(cfg: Config) -> None:
    """Generate the embedded synthetic data when the recipe asks for it (smoke runs)."""
    if cfg.data.synth_dir is None:
        return
    from data_pipelines.synth import ensure_embedded_data

    ensure_embedded_data(Path(cfg.data.synth_dir), seed=0, vocab_size=cfg.model.language_model.vocab_size)
    if embedded_lm.applies(cfg):
        embedded_lm.ensure_embedded_lm(cfg)


def use_embedded_lm(cfg: Config) -> None:
    """`init.embedded_lm`: the stage starts from the smoke LM rank 0 built in `prepare_data_files` (every
    rank computes the same directory), named in init.from_checkpoint so config.yaml says where it came from."""
    if embedded_lm.applies(cfg):
        cfg.init.from_checkpoint = str(embedded_lm.embedded_lm_dir(cfg))


def build_data(cfg: Config, tokenizer: Tokenizer, info: DistInfo) -> PackedBatchStream:
    return build_batch_stream(cfg.data, tokenizer, tokens_per_tile=cfg.model.tokens_per_tile, seed=cfg.seed,
                              micro_batch_size=cfg.trainer.micro_batch_size, rank=info.data_rank,
                              world_size=info.data_size, loss_weighting=cfg.trainer.loss_weighting)


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


def set_cpu_threads(configured: int) -> tuple[int, str]:
    """torch's intra-op thread count for this process (`trainer.cpu_threads`), and why. Torch's own
    default takes every core of the machine, which oversubscribes a shared or busy one."""
    if configured:
        threads, why = configured, "trainer.cpu_threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, cores // local)
        why = f"{cores} cores available / {local} process{'es' if local > 1 else ''} on this node"
    torch.set_num_threads(threads)
    return threads, why


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
        if tokenizer.vocab_size > cfg.model.language_model.vocab_size:
            raise ConfigError(f"model.language_model.vocab_size={cfg.model.language_model.vocab_size} is smaller than "
                              f"the tokenizer's {tokenizer.vocab_size} tokens: raise it")
        stage = assemble(cfg, info, tokenizer.special_ids, resume_from=self.ckpt_root, log=self.log)
        self.model, self.optimizer, self.precision, self.layout = stage.model, stage.optimizer, stage.precision, stage.layout
        self.data = build_data(cfg, tokenizer, info)
        # Cumulative since the stage started, across resumes (global: every rank holds the same).
        self.step, self.tokens, self.samples_total = 0, 0, 0
        if stage.resumed is not None:
            latest, saved = stage.resumed
            self.step, self.tokens = saved["step"], saved["tokens"]
            # One data position per data-parallel rank; the parallel layout may have changed since.
            data_states = read_data_states(latest)
            # Checkpoints from before `samples_total` was kept: the loader's per-source counts over
            # all replicas are the same number (every used sample is counted once, in one step).
            self.samples_total = saved.get("samples_total",
                                           sum(sum(d.get("samples_by_source", {}).values()) for d in data_states))
            if len(data_states) == info.data_size:
                self.data.load_state_dict(data_states[info.data_rank])
            else:
                self.data.load_resharded(data_states)
                self.log(f"resharded the data position from {len(data_states)} to {info.data_size} ranks of data parallelism")
            self.log(f"resumed from {latest} at step {self.step}")
            self._note_schedule_change(read_marker(latest).get("max_steps"))
        self.train_module = TrainModule(stage.forward_module, self.optimizer, cfg, info, self.precision,
                                        stage.engine.step_schedule(stage.forward_module, info, self.precision))
        if stage.resumed is not None:  # a cumulative count like the others (older checkpoints: 0)
            self.train_module.nonfinite_total = stage.resumed[1].get("nonfinite_skipped", 0)
        self.validator = Validator(cfg, tokenizer, info, self.precision)
        # Held-out rows are built now, not at the first evaluation: a missing, empty or unusable
        # held-out source stops the run before its first step instead of after eval_every steps.
        if self.validator.enabled:
            self.validator.sets()
        self.last_val: dict[str, float] = {}
        self.report_plots: dict[str, Path] = {}
        self.checkpointer = Checkpointer(self.ckpt_root, cfg.trainer.keep_last, cfg.trainer.async_save, self.layout,
                                         marker={"random_parts": stage.random_parts, "max_steps": cfg.trainer.max_steps,
                                                 **({"adapters": stage.adapters} if stage.adapters else {})})

    def _note_schedule_change(self, saved_max_steps: int | None) -> None:
        """The schedule spans trainer.max_steps: resuming with another value reshapes the LR from here on."""
        now = self.cfg.trainer.max_steps
        if saved_max_steps is not None and saved_max_steps != now and self.cfg.optim.schedule != "constant":
            self.log(f"note: trainer.max_steps is {now}, the checkpoint was saved by a run of {saved_max_steps}: the "
                     f"{self.cfg.optim.schedule} learning-rate schedule now spans {now} steps, so from step "
                     f"{self.step + 1} on the LR differs from the interrupted run's")

    def log(self, message: str) -> None:
        if self.info.is_main:
            print(f"[{self.cfg.stage}] {message}", flush=True)

    def _callbacks(self, preemption: PreemptionHandler) -> list[Callback]:
        """In the order they run: validation first (its numbers join the step's record), the
        checkpoint (and a preemption's exit) last, after the step is logged."""
        cfg, main = self.cfg, self.info.is_main
        callbacks: list[Callback] = [Validation(self.validator)]
        if main:
            self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl", self.step)
            callbacks += [self.metrics_file,
                          WandbLogger(cfg.logger.wandb.mode, cfg.logger.wandb.project, cfg.logger.wandb.entity,
                                      self.run_dir, cfg.stage, dataclasses.asdict(cfg))]
            if cfg.logger.tensorboard:
                callbacks.append(TensorBoardLogger(self.run_dir / "tensorboard", self.step))
            callbacks.append(Progress(cfg.stage, self.step, cfg.trainer.max_steps, cfg.logger.progress_bar))
        return callbacks + [Checkpointing(cfg.trainer.save_every, cfg.trainer.max_steps, preemption)]

    def fit(self, preemption: PreemptionHandler | None = None) -> dict:
        own_handler = preemption is None
        preemption = PreemptionHandler(self.info.device).install() if own_handler else preemption
        self.metrics_file: MetricsFile | None = None
        self.callbacks = self._callbacks(preemption)
        try:
            last_loss = self._loop(preemption)
            if not math.isfinite(last_loss) and self.metrics_file is not None and self.metrics_file.last_loss is not None:
                last_loss = self.metrics_file.last_loss  # resumed with no step left to run
            if not self.last_val and self.metrics_file is not None:
                self.last_val = self.metrics_file.last_val
            self.checkpointer.wait()
            summary = self._write_summary(last_loss)
            if self.info.is_main:
                self._write_report()
            for callback in self.callbacks:
                callback.on_fit_end(self, summary)
        finally:
            self.checkpointer.wait()  # an async save in flight completes (also on preemption)
            if own_handler:
                preemption.uninstall()
            for callback in self.callbacks:
                callback.close()
            self.data.close()
        return summary

    def _loop(self, preemption: PreemptionHandler) -> float:
        """Step, then the step's collectives, then the callbacks; returns the last finite loss."""
        t, last_loss = self.cfg.trainer, float("nan")
        validation = self.callbacks[0]
        while self.step < t.max_steps:
            started = time.monotonic()
            result = self.train_module.train_step([self.data.next_batch() for _ in range(t.grad_accum_steps)], self.step)
            preemption.mark_stepped()
            self.step += 1
            self.tokens += result.real_tokens
            self.samples_total += result.samples
            if not result.skipped_nonfinite:
                last_loss = result.loss
            elapsed = time.monotonic() - started
            logs = self.step % t.log_every == 0 or self.step == t.max_steps or validation.due(self.step)
            event = StepEnd(self.step, result, elapsed, self._record(result, elapsed) if logs else None)
            for callback in self.callbacks:
                callback.on_step_end(self, event)
            if event.val:
                for callback in self.callbacks:
                    callback.on_validation(self, self.step, event.val)
        return last_loss

    def _record(self, result: StepResult, elapsed: float) -> dict:
        """The step's metrics.jsonl record (JSON has no NaN: a skipped non-finite step logs loss and
        grad_norm as null), with the loader's counts summed over the ranks: a collective. Per step:
        loss, lr, grad_norm, step_time_s, packing_efficiency, samples, supervised_tokens,
        evs_keep_ratio; cumulative since the stage started (across resumes): tokens, samples_total,
        nonfinite_skipped, epochs and the loader's tables (README "metrics.jsonl fields")."""
        record = {
            "stage": self.cfg.stage, "step": self.step, "loss": _finite_or_none(result.loss), "lr": result.lr,
            "tokens": self.tokens, "grad_norm": _finite_or_none(result.grad_norm), "step_time_s": elapsed,
            "nonfinite_skipped": self.train_module.nonfinite_total,
            "packing_efficiency": result.real_tokens / result.slots, "samples": result.samples,
            "samples_total": self.samples_total,
            "supervised_tokens": result.supervised_tokens, "epochs": round(self.data.epochs, 4),
            **self._loader_counts(), **result.precision_metrics,
        }
        if result.evs_keep_ratio is not None:
            record["evs_keep_ratio"] = result.evs_keep_ratio
        return record

    def _loader_counts(self) -> dict:
        """Skips (per reason, and per source/reason), samples, tokens and fallbacks per source, summed
        over the data-parallel replicas in one gather (every rank takes part)."""
        d = self.data
        return sum_count_tables({"skipped": d.skipped, "skipped_by_source": d.skipped_by_source,
                                 "samples_by_source": d.samples_by_source, "tokens_by_source": d.tokens_by_source,
                                 "fallbacks_by_source": d.fallbacks_by_source}, self.info)

    def save(self) -> None:
        state = {"step": self.step, "tokens": self.tokens, "samples_total": self.samples_total,
                 "nonfinite_skipped": self.train_module.nonfinite_total, "data_rank": self.info.data_rank,
                 "data": self.data.state_dict()}
        self.checkpointer.save(self.step, self.model, self.optimizer, state, self.precision.state_dict())

    def _write_report(self) -> None:
        """report.html + plots in the run dir (the plots go to wandb at `on_fit_end`). A report that
        cannot be drawn is a warning, never a failed stage: the training it describes is done and saved."""
        try:
            path, self.report_plots = write_stage_report(self.run_dir)
        except Exception as err:  # matplotlib / disk trouble must not fail a finished stage
            self.log(f"warning: report.html not written ({type(err).__name__}: {err}); "
                     f"rebuild it with `python -m train.report {self.run_dir}`")
            return
        self.log(f"report: {path}")

    def _write_summary(self, last_loss: float) -> dict:
        latest = find_latest(self.ckpt_root)
        summary = {
            "stage": self.cfg.stage, "steps": self.step, "final_loss": _finite_or_none(last_loss),
            "tokens": self.tokens, "samples_total": self.samples_total,
            "epochs": round(self.data.epochs, 4), **self._loader_counts(),
            "val": {k.removeprefix("val/"): _finite_or_none(v) for k, v in self.last_val.items()},
            "checkpoint": str(latest) if latest else None,
        }
        if self.validator.enabled and self.last_val:
            summary["val_skipped"] = self.validator.skipped()
        if self.info.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.log(f"done: {self.step} steps, final loss {last_loss:.4f}, checkpoint {summary['checkpoint']}")
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
    check_logger_packages(cfg.logger)  # a missing wandb / tensorboard: exit 2 now, on every rank alike
    # Installed before anything slow (process groups, data generation, resume, data warm-up), so a
    # preemption or a kill during start-up stops the run at once (exit 75) instead of waiting.
    own_handler = preemption is None
    preemption = PreemptionHandler().install() if own_handler else preemption
    preemption.stepped = False
    try:
        info = resolve_engine(cfg.model.impl).init_distributed(cfg)
    except BaseException:
        if own_handler:
            preemption.uninstall()
        raise
    preemption.device = info.device
    try:
        threads, why = set_cpu_threads(cfg.trainer.cpu_threads)
        if info.is_main:
            print(f"[{cfg.stage}] {threads} intra-op thread{'s' if threads > 1 else ''} per process ({why})", flush=True)
            prepare_data_files(cfg)
            check_stage_benchmarks(cfg)
        barrier()  # the other ranks wait for rank 0's data files
        use_embedded_lm(cfg)
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            write_run_config(run_dir, dataclasses.asdict(cfg))
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
    if (cfg.eval.tasks or cfg.eval.vlm_tasks) and info.is_main:
        summary = run_stage_benchmarks(cfg, summary)
    return summary


def check_stage_benchmarks(cfg: Config) -> None:
    """Before training: every `eval.vlm_tasks` task is known and its data present locally, so a
    stage does not train for hours to fail at its end (the harness's task index, built here, is
    reused there)."""
    if cfg.eval.vlm_tasks:
        import tempfile

        from train.evaluate.harness import EvaluationError
        from train.evaluate.vlm_harness import prepare_tasks

        with tempfile.TemporaryDirectory(prefix="vlm_tasks_") as work:
            try:
                prepare_tasks(cfg.eval.vlm_tasks, cfg.eval.vlm_data_dir, Path(work))
            except EvaluationError as err:
                raise ConfigError(f"eval.vlm_tasks: {err}") from None


def run_stage_benchmarks(cfg: Config, summary: dict) -> dict:
    """`eval.tasks` and `eval.vlm_tasks` on the stage's final checkpoint (rank 0, after training):
    results in summary.json ("lm_eval", "vlm_eval") and <run dir>/eval/."""
    run_dir = Path(cfg.run.dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.eval.tasks:
        from train.evaluate.harness import evaluate_checkpoint

        print(f"[{cfg.stage}] lm-eval: {', '.join(cfg.eval.tasks)} on {summary['checkpoint']}", flush=True)
        out_file, report = evaluate_checkpoint(Path(summary["checkpoint"]), cfg.eval.tasks, run_dir / "eval",
                                               limit=cfg.eval.limit, device=device)
        summary = {**summary, "lm_eval": {"file": str(out_file), "results": report.get("results", {}),
                                         "skipped": report.get("skipped", {})}}
    if cfg.eval.vlm_tasks:
        from train.evaluate.vlm_harness import evaluate_checkpoint_vlm

        e = cfg.eval
        print(f"[{cfg.stage}] vision-language benchmarks: {', '.join(e.vlm_tasks)} on {summary['checkpoint']}", flush=True)
        out_file, report = evaluate_checkpoint_vlm(Path(summary["checkpoint"]), e.vlm_tasks, run_dir / "eval",
                                                   data_dir=e.vlm_data_dir, limit=e.limit, batch_size=e.vlm_batch_size,
                                                   think=e.vlm_think, max_gen_toks=e.vlm_max_new_tokens, device=device)
        summary = {**summary, "vlm_eval": {"file": str(out_file), "results": report.get("results", {}),
                                          "think": e.vlm_think}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:  # the stage report again, now with the scores
        write_stage_report(run_dir)
    except Exception as err:  # as in Trainer._write_report: a plot problem must not fail a finished stage
        print(f"[{cfg.stage}] warning: report.html not rewritten ({type(err).__name__}: {err})", flush=True)
    return summary
