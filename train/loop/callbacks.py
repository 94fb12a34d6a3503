"""The side jobs of the training loop, as callbacks: the loop runs a step and its collectives, then
calls every callback's hooks in list order (OLMo-core's `train/callbacks/` is the model).

  Validation         held-out loss every `trainer.eval_every` steps (a collective: every rank)
  MetricsFile        metrics.jsonl (rank 0)
  WandbLogger        wandb, offline unless configured (rank 0)
  TensorBoardLogger  TensorBoard event files in <run dir>/tensorboard/, when configured (rank 0)
  Progress           a tqdm bar on a terminal, plain lines in a log (rank 0)
  Checkpointing      interval saves, the async save's completion, the preemption save (every rank)

Hooks (each a no-op by default): `on_step_end(trainer, event)` after every step; `on_validation(trainer,
step, val)` after a held-out evaluation, once every callback has seen the step; `on_fit_end(trainer,
summary)` when the stage is done; `close()` always, last (also after an error or a preemption).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from train.config.schema import ConfigError, LoggerConfig
from train.evaluate.heldout import Validator
from train.loop.preemption import Preempted, PreemptionHandler, mark_preempted
from train.loop.train_module import StepResult
from train.report.build import read_metrics_records, shown_val


@dataclass
class StepEnd:
    step: int  # optimizer steps done, this one included
    result: StepResult
    elapsed_s: float
    # What metrics.jsonl, wandb and TensorBoard get this step; None on a step that does not log.
    # Callbacks earlier in the list may add to it (Validation adds val/*).
    record: dict | None
    val: dict[str, float] | None = None  # the held-out losses, on a step that evaluated


class Callback:
    """`trainer`: the `train.loop.trainer.Trainer` running the loop (its state: step, model, data,
    checkpointer, train_module, `log`)."""

    def on_step_end(self, trainer, event: StepEnd) -> None:
        pass

    def on_validation(self, trainer, step: int, val: dict[str, float]) -> None:
        pass

    def on_fit_end(self, trainer, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Validation(Callback):
    """Held-out loss when due; its numbers join the step's record (the loop logs every evaluating step)."""

    def __init__(self, validator: Validator):
        self.validator = validator

    def due(self, step: int) -> bool:
        return self.validator.due(step)

    def on_step_end(self, trainer, event):
        if not self.validator.due(event.step):
            return
        event.val = self.validator.evaluate(trainer.train_module.loss_sum)
        if event.val:
            trainer.last_val = event.val
            event.record.update(event.val)


class MetricsFile(Callback):
    """`metrics.jsonl`, one JSON object per logged step. On resume, lines past the resumed step
    (logged after the checkpoint, before a crash) are dropped so no step appears twice, and so are
    unreadable lines (a write cut by a kill or a full disk), with a warning."""

    def __init__(self, path: Path, resumed_step: int):
        self.path = path
        # The loss of the last kept step, so a resumed run with no step left still reports it.
        self.last_loss: float | None = None
        self.last_val: dict[str, float] = {}
        if path.exists():
            records, unreadable = read_metrics_records(path)
            if unreadable:
                print(f"warning: {path}: dropped {unreadable} unreadable line(s) (a write cut by a kill or a full "
                      "disk); the steps they held are logged again as the run continues", file=sys.stderr, flush=True)
            kept = [r for r in records if r["step"] <= resumed_step]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))
            self.last_loss = next((r["loss"] for r in reversed(kept) if r.get("loss") is not None), None)
            # The last held-out evaluation, for the summary of a run resumed with no step left.
            self.last_val = next(({k: v for k, v in r.items() if k.startswith("val/")} for r in reversed(kept)
                                  if any(k.startswith("val/") for k in r)), {})

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer, event):
        if event.record is not None:
            self.log(event.record)


class Progress(Callback):
    """A tqdm bar on a terminal; plain lines (loss, gradient norm, tokens/s, ETA) when output is a file
    or CI log."""

    def __init__(self, stage: str, start_step: int, max_steps: int, enabled: bool):
        self.interactive = enabled and sys.stderr.isatty()
        self.stage, self.max_steps = stage, max_steps
        self.start_step, self.started = start_step, time.monotonic()
        self.bar = tqdm(total=max_steps, initial=start_step, desc=stage, dynamic_ncols=True) if self.interactive else None

    def update(self, step: int, loss: float, tokens_per_s: float, grad_norm: float) -> None:
        done = step - self.start_step
        eta = (time.monotonic() - self.started) / max(done, 1) * (self.max_steps - step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", grad_norm=f"{grad_norm:.3g}", tok_s=f"{tokens_per_s:,.0f}")
        else:
            print(f"[{self.stage}] step {step}/{self.max_steps} loss {loss:.4f} grad_norm {grad_norm:.3g} "
                  f"tok/s {tokens_per_s:,.0f} eta {eta:.0f}s", flush=True)

    def on_step_end(self, trainer, event):
        if event.record is not None:
            self.update(event.step, event.result.loss, event.result.real_tokens / event.elapsed_s,
                        event.result.grad_norm)

    def on_validation(self, trainer, step, val):
        shown = shown_val(val, len(trainer.cfg.data.val_sources))
        trainer.log("val " + ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ExperimentLogger(Callback):
    """A logger of the step records and, at the end, the report's plots (wandb, TensorBoard)."""

    def on_step_end(self, trainer, event):
        if event.record is not None:
            self.log(event.record)

    def on_fit_end(self, trainer, summary):
        self.log_images(trainer.report_plots, trainer.step)

    def log(self, record: dict) -> None:
        raise NotImplementedError

    def log_images(self, images: dict[str, Path], step: int) -> None:
        raise NotImplementedError


class WandbLogger(ExperimentLogger):
    """wandb in the configured mode (offline by default; never a key in config or logs)."""

    def __init__(self, mode: str, project: str, entity: str | None, run_dir: Path, stage: str, config: dict):
        self.run = None
        if mode == "disabled":
            return
        import wandb

        run_id = f"{stage}-{zlib.crc32(str(run_dir.resolve()).encode()):08x}"
        self.run = wandb.init(mode=mode, project=project, entity=entity, dir=str(run_dir), name=stage,
                              id=run_id, resume="allow", config=config)

    def log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """The report's plots as wandb images, one panel each ("report/<title>")."""
        if self.run is not None and images:
            import wandb

            self.run.log({f"report/{title}": wandb.Image(str(path)) for title, path in images.items()}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def check_logger_packages(cfg: LoggerConfig) -> None:
    """Every logger the config turns on can be imported: checked on every rank before anything slow,
    so a missing package stops the run at start (exit 2), not at its first logged step."""
    needed = []  # (package, the setting that needs it, the setting that turns it off)
    if cfg.wandb.mode != "disabled":
        needed.append(("wandb", f"logger.wandb.mode={cfg.wandb.mode}", "logger.wandb.mode=disabled"))
    if cfg.tensorboard:
        needed.append(("tensorboard", "logger.tensorboard=true", "logger.tensorboard=false"))
    for package, setting, off in needed:
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{setting} needs the {package} package, which is not installed: pip install "
                              f"'{package}' (a dependency of this project: `make setup` installs it), or set {off}")


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as TensorBoard tags: the step's own numbers under train/ (train/loss,
    train/lr, train/grad_norm, train/tokens...), held-out losses under their val/... names, and the
    per-reason and per-source counts under their table's name (skipped/<reason>,
    samples_by_source/<source>, skipped_by_source/<source>/<reason>). Nulls (a non-finite loss) and
    text are left out."""
    scalars: dict[str, float] = {}

    def add(tag: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{tag}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[tag] = float(value)

    for key, value in record.items():
        if key in ("stage", "step"):
            continue
        add(key if "/" in key or isinstance(value, dict) else f"train/{key}", value)
    return scalars


class TensorBoardLogger(ExperimentLogger):
    """TensorBoard event files in `log_dir` (`<run dir>/tensorboard/`; a pipeline's stages are its runs
    under `tensorboard --logdir <pipeline run dir>`): every logged step's numbers at that step, and
    the report's plots as images at the end. A resumed run purges the steps past the checkpoint,
    as metrics.jsonl drops them, so no step shows twice."""

    def __init__(self, log_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: check_logger_packages first

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, record: dict) -> None:
        for tag, value in tensorboard_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """The report's plots, one image each ("report/<title>")."""
        for title, path in images.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
            self.writer.add_image(f"report/{title}", pixels, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class Checkpointing(Callback):
    """Saves every `trainer.save_every` steps and at the last; completes an async save once its writes
    are done; on a preemption signal saves (unless this step just did), waits for the writes,
    marks the run preempted and raises `Preempted` (exit 75: rerun to resume)."""

    def __init__(self, save_every: int, max_steps: int, preemption: PreemptionHandler):
        self.save_every, self.max_steps = save_every, max_steps
        self.preemption = preemption

    def on_step_end(self, trainer, event):
        trainer.checkpointer.poll()  # an async save whose writes are done becomes `latest`
        saved = event.step % self.save_every == 0 or event.step == self.max_steps
        if saved:
            trainer.save()
        if event.step < self.max_steps and self.preemption.should_stop():
            if not saved:
                trainer.save()
            trainer.checkpointer.wait()
            trainer.log(f"preempted: saved step {event.step}; rerun the same command to resume")
            mark_preempted(f"saved step {event.step}")
            raise Preempted(event.step)
