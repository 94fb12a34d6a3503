"""Things that watch the loop: metrics file, progress output, wandb. Rank 0 only."""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

from tqdm import tqdm

from train.reporting.report import read_metrics_records


class MetricsFile:
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


class Progress:
    """A tqdm bar on a terminal; plain lines (loss, tokens/s, ETA) when output is a file or CI log."""

    def __init__(self, stage: str, start_step: int, max_steps: int, enabled: bool):
        self.interactive = enabled and sys.stderr.isatty()
        self.stage, self.max_steps = stage, max_steps
        self.start_step, self.started = start_step, time.monotonic()
        self.bar = tqdm(total=max_steps, initial=start_step, desc=stage, dynamic_ncols=True) if self.interactive else None

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        done = step - self.start_step
        eta = (time.monotonic() - self.started) / max(done, 1) * (self.max_steps - step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        else:
            print(f"[{self.stage}] step {step}/{self.max_steps} loss {loss:.4f} "
                  f"tok/s {tokens_per_s:,.0f} eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class WandbLogger:
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
