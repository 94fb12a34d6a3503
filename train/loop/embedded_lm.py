"""The smoke runs' pre-trained language model: trained on the embedded data, cached with it.

The real recipe's Stage 0 starts from a trained language model (`train.convert compose`) and trains
only the projector into it. A smoke Stage 0 on a random frozen LM sits at ln(vocab) whatever the
projector does; and an LM pre-trained on the embedded conversations alone barely reads its context, so
a projector has nothing to learn to say to it. So where a smoke stage freezes a language model that
nothing loads (`init.embedded_lm`), it starts from one pre-trained here on the image scenes written out
as text where the image would be (`<root>/described_image`: the image shards' questions, answers derived
from the scene), so the LM learns to answer from a scene described far back in its context. The Stage 0
projector then learns to write the image into those positions: its loss falls (measured: about 0.56 ->
0.46 over the 24 smoke steps, where an untrained projector's rises to 0.68 on the same batches).
Code text is left out of this mix on purpose: with a quarter of code the LM read the scene less and
Stage 0 stayed flat; Stage 3 trains it on code anyway.

Built once per embedded data set and model (`<synth_dir>/lm/<key>/`, a native model-only
checkpoint; the vision tower and projector stay at the seeded init and are recorded as random),
deterministically, in a few hundred CPU steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import time
from pathlib import Path

import torch

from data_pipelines.training.config import SourceConfig
from data_pipelines.training.loader import build_batch_stream
from data_pipelines.training.samples import Tokenizer
from train.checkpoint.files import find_latest
from train.checkpoint.store import write_model_checkpoint
from train.config.schema import MODEL_PARTS, Config, InitConfig, PeftConfig, TrainableConfig

# The pre-training run: short rows (one or two described scenes each), a high learning rate.
STEPS = 400
SEQ_LENGTH = 256
MICRO_BATCH = 2
LR, WARMUP_STEPS = 5.0e-3, 20
# The described scenes alone (see above); source -> weight, each a directory under data.synth_dir.
WEIGHTS = {"described_image": 1.0}
VERSION = 1  # bump when the recipe above changes, so a cached LM is rebuilt


def applies(cfg: Config) -> bool:
    """A smoke stage (`data.synth_dir`) that freezes a language model nothing else loads."""
    return (cfg.init.embedded_lm and cfg.data.synth_dir is not None and not cfg.init.from_checkpoint
            and not cfg.trainable.language_model)


def embedded_lm_dir(cfg: Config) -> Path:
    """Where the LM for this embedded data and model lives; keyed by all that shapes it."""
    root = Path(cfg.data.synth_dir)
    key = json.dumps({"model": dataclasses.asdict(cfg.model), "data": (root / "COMPLETE").read_text(),
                      "steps": STEPS, "seq_length": SEQ_LENGTH, "lr": LR, "weights": WEIGHTS, "seed": cfg.seed,
                      "version": VERSION}, sort_keys=True)
    return root / "lm" / hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_embedded_lm(cfg: Config) -> Path:
    """The cached LM's run directory, pre-training it first when absent (one process at a time)."""
    out = embedded_lm_dir(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if find_latest(out / "checkpoints") is None:  # a checkpoint is published atomically: absent or whole
            pretrain(cfg, out)
    return out


def pretraining_config(cfg: Config) -> Config:
    """The stage's model and data settings; the LM trains alone on the pre-training mix."""
    pre = copy.deepcopy(cfg)
    root = Path(cfg.data.synth_dir)
    pre.init = InitConfig(allow_random=list(MODEL_PARTS))
    pre.peft = PeftConfig()  # the LM itself trains (a stage's `peft=lora` is for the stages)
    pre.trainable = TrainableConfig(language_model=True, vision_model=False, projector=False)
    pre.data.sources = [SourceConfig(name=f"synth_{kind}", path=str(root / kind), weight=weight)
                        for kind, weight in WEIGHTS.items()]
    pre.data.seq_length, pre.data.num_workers = SEQ_LENGTH, 0
    pre.optim.lr, pre.optim.warmup_steps, pre.optim.min_lr, pre.optim.min_lr_ratio = LR, WARMUP_STEPS, 0.0, 0.1
    pre.trainer.max_steps, pre.trainer.grad_accum_steps, pre.trainer.micro_batch_size = STEPS, 1, MICRO_BATCH
    pre.model.impl, pre.model.compile, pre.precision.name = "native", False, "fp32"
    return pre


def pretrain(cfg: Config, out: Path) -> Path:
    from train.engines.assembly import assemble
    from train.loop.train_module import TrainModule
    from train.parallel.distributed import DistInfo

    pre = pretraining_config(cfg)
    start = time.perf_counter()
    print(f"[embedded_lm] pre-training the smoke language model ({STEPS} steps) into {out}", flush=True)
    tokenizer = Tokenizer.load(pre.data.tokenizer)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    rng_state = torch.get_rng_state()
    torch.manual_seed(pre.seed)
    try:
        stage = assemble(pre, info, tokenizer.special_ids, log=lambda _: None)
        module = TrainModule(stage.forward_module, stage.optimizer, pre, info, stage.precision)
        data = build_batch_stream(pre.data, tokenizer, tokens_per_tile=pre.model.tokens_per_tile, seed=pre.seed,
                                  micro_batch_size=MICRO_BATCH)
        with contextlib.closing(data):
            losses = [module.train_step([data.next_batch()], step).loss for step in range(STEPS)]
    finally:
        torch.set_rng_state(rng_state)
    # The vision tower and projector were never trained: recorded as random, as any checkpoint records them.
    checkpoint = write_model_checkpoint(out, STEPS, stage.model.state_dict(),
                                        {"random_parts": ["vision_model", "projector"]})
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"[embedded_lm] loss {first:.3f} -> {last:.3f} ({time.perf_counter() - start:.1f}s)", flush=True)
    return checkpoint
