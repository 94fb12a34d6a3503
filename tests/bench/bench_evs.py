"""EVS in training: how much language-model compute does pruning video tokens save?

EVS keeps `max(P, int(T * P * (1 - q)))` of a video's T x P tokens, so the same videos become
shorter samples, pack into fewer rows and cost fewer LM FLOPs. Side by side at q = 0, 0.5, 0.75:

- analytic: LM training FLOPs (forward + backward = 3x forward) of the 12B recipe's hybrid LM
  (62 layers, `M-M-...`) over a realistic stage-2 video mix (2 fps, <= 128 frames, 256 tokens
  per frame, 49,152-token rows packed by our Packer, padding included since the model computes
  it), per epoch of the mix, per recipe step (8 rows) and per video; attention's quadratic term
  counted per packed sample, Mamba2's chunked scan per token.
- measured: wall time of real training steps (ViT + projector + LM forward/backward + AdamW) of a
  small model on CPU over the same video samples, packed the same way, with the same analytic
  count for that model next to it: the ratios should agree where the LM dominates.

Ratios are against q = 0 in the same run; nothing here asserts on time.
Run: `python -m tests.bench.run_all evs` (or `make bench` for all benchmarks).
"""

from __future__ import annotations

import random
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import MediaSlot, Message, frame_label, tokenize_with_media_spans
from data_pipelines.training.evs import kept_token_count
from data_pipelines.training.packing import Packer, collate_rows
from data_pipelines.training.samples import Sample
from train.config.schema import LanguageModelConfig, ModelConfig, ProjectorConfig, VisionConfig

NAME = "bench_evs"
QS = (0.0, 0.5, 0.75)
SEED = 0

# ---- analytic: the 12B recipe on a stage-2 video mix --------------------------------------
NUM_VIDEOS = 4000
SEQ_LENGTH = 49_152
ROWS_PER_STEP = 8  # stage2_video_sft: micro_batch_size 1 x grad_accum_steps 8
PACK_BUFFER = 64
FPS, MAX_FRAMES, TOKENS_PER_FRAME = 2.0, 128, 256
# "Frame 12 sampled at 5.50 seconds: " is ~12 tokens with a BPE tokenizer, plus `<img>` `</img>`.
FRAME_OVERHEAD = 14

# ---- measured: a small model on CPU --------------------------------------------------------
TINY_LM = LanguageModelConfig(pattern="M-M*M-M-", hidden_size=128, vocab_size=1024, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=32,
                              ssm_state_size=16, n_groups=2, chunk_size=64, mlp_hidden_size=512)
# 256 px frames -> 16x16 patches -> 64 tokens per frame after pixel shuffle.
TINY_VISION = VisionConfig(image_size=256, patch_size=16, hidden_size=32, num_layers=2, num_heads=2)
TINY_VIDEOS, TINY_FRAMES, TINY_SEQ_LENGTH = 24, 8, 2048
REPEATS = 3  # best of 3 after one warm-up step


# ---- analytic FLOPs -----------------------------------------------------------------------

def lm_forward_flops(lm: LanguageModelConfig, segments: list[int], supervised: int) -> dict[str, float]:
    """Forward FLOPs of the hybrid LM over packed segments (samples and padding), by part.

    Per token: Mamba2 in/out projections, depthwise conv and the chunked SSD scan (intra-chunk
    C.B^T and its product with x, plus the chunk-state terms); attention projections; the
    squared-ReLU MLP. Per segment of n tokens: causal attention scores and values, 2 n(n+1)
    h d. The LM head runs on supervised tokens only (the loss gathers them before the head).
    """
    d, inner, heads, p = lm.hidden_size, lm.mamba_intermediate_size, lm.mamba_num_heads, lm.mamba_head_dim
    groups, state, q = lm.n_groups, lm.ssm_state_size, lm.chunk_size
    conv_dim = inner + 2 * groups * state
    mamba = (2 * d * (inner + conv_dim + heads) + 2 * inner * d + 2 * lm.conv_kernel * conv_dim
             + 2 * q * groups * state + heads * (2 * q * p + 4 * state * p))
    q_width, kv_width = lm.num_attention_heads * lm.head_dim, lm.num_key_value_heads * lm.head_dim
    attn_proj = 2 * d * (q_width + 2 * kv_width) + 2 * q_width * d
    mlp = 4 * d * lm.mlp_hidden_size
    counts = {kind: lm.pattern.count(kind) for kind in "M*-"}
    tokens = sum(segments)
    scores = sum(2.0 * n * (n + 1) * q_width for n in segments)
    return {
        "mamba": float(counts["M"] * mamba * tokens),
        "attention_proj": float(counts["*"] * attn_proj * tokens),
        "attention_scores": counts["*"] * scores,
        "mlp": float(counts["-"] * mlp * tokens),
        "head": float(2 * d * lm.vocab_size * supervised),
    }


def training_flops(lm: LanguageModelConfig, rows: list[list[int]], seq_length: int,
                   supervised: int) -> dict[str, float]:
    """3x forward over packed rows; each row's padding is one more segment."""
    segments = [n for row in rows for n in row] + [seq_length - sum(row) for row in rows if sum(row) < seq_length]
    return {part: 3.0 * value for part, value in lm_forward_flops(lm, segments, supervised).items()}


# ---- the stage-2 video mix ----------------------------------------------------------------

@dataclass(frozen=True)
class VideoMix:
    frames: np.ndarray  # (N,) frames after 2 fps sampling, capped at 128 (uniform when longer)
    prompt_tokens: np.ndarray  # (N,) system + question + chat markup, unsupervised
    answer_tokens: np.ndarray  # (N,) supervised


def draw_video_mix(num: int = NUM_VIDEOS, seed: int = SEED) -> VideoMix:
    """Clip lengths log-normal around 45 s (a few seconds to half an hour): about a third of the
    videos reach the 128-frame cap, as long-form video QA sets do; short prompts, longer answers."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(45.0), 1.0, num), 2.0, 1800.0)
    frames = np.minimum(MAX_FRAMES, np.maximum(1, np.rint(seconds * FPS))).astype(np.int64)
    prompt = np.rint(rng.lognormal(np.log(80.0), 0.5, num)).astype(np.int64)
    answer = np.rint(rng.lognormal(np.log(150.0), 0.9, num)).astype(np.int64) + 1
    return VideoMix(frames, prompt, answer)


def mix_lengths(mix: VideoMix, q: float, tokens_per_frame: int = TOKENS_PER_FRAME,
                frame_overhead: int = FRAME_OVERHEAD) -> tuple[np.ndarray, np.ndarray]:
    """(sample lengths, media tokens kept) at pruning rate q."""
    kept = np.array([kept_token_count(int(t), tokens_per_frame, q) for t in mix.frames], dtype=np.int64)
    return mix.prompt_tokens + mix.answer_tokens + mix.frames * frame_overhead + kept, kept


class Length:
    """A stand-in for `Sample`: the packer reads only `.length`."""

    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = length


def pack_lengths(lengths: np.ndarray, seq_length: int, buffer: int = PACK_BUFFER) -> list[list[int]]:
    """Rows of sample lengths, packed as the loader packs: refill the buffer, pop a row, repeat."""
    packer, rows, pending = Packer(seq_length), [], [Length(int(n)) for n in lengths]
    pending.reverse()
    while pending or packer.buffer:
        while pending and len(packer.buffer) < buffer:
            packer.add(pending.pop())
        rows.append([s.length for s in packer.pop_row()])
    return rows


def analytic_12b(lm: LanguageModelConfig) -> list[dict]:
    mix = draw_video_mix()
    supervised = int(mix.answer_tokens.sum())
    results = []
    for q in QS:
        lengths, kept = mix_lengths(mix, q)
        rows = pack_lengths(lengths, SEQ_LENGTH)
        flops = training_flops(lm, rows, SEQ_LENGTH, supervised)
        total = sum(flops.values())
        real = sum(training_flops(lm, [[int(n)] for n in lengths], 0, supervised).values())  # no padding
        results.append({
            "q": q, "videos": len(lengths), "media_tokens": int(kept.sum()), "tokens": int(lengths.sum()),
            "rows": len(rows), "steps": len(rows) / ROWS_PER_STEP,
            "fill": float(lengths.sum() / (len(rows) * SEQ_LENGTH)),
            "lm_flops_epoch": total, "lm_flops_real_tokens": real,
            "lm_flops_per_step": total / len(rows) * ROWS_PER_STEP,
            "lm_flops_per_video": total / len(lengths), "flops_by_part": flops,
        })
    add_ratios(results, ("media_tokens", "tokens", "rows", "lm_flops_epoch", "lm_flops_real_tokens"))
    return results


def add_ratios(results: list[dict], keys: tuple[str, ...]) -> None:
    base = results[0]
    for r in results:
        r["ratio"] = {k: r[k] / base[k] for k in keys}


# ---- measured: real training steps of a small model on CPU --------------------------------

def word_encode(text: str) -> list[int]:
    """A deterministic word-level stand-in tokenizer (ids after the special tokens), so the bench
    needs no trained tokenizer: frame labels and text get realistic word-sized token counts."""
    first = len(st.ALL_SPECIAL_TOKENS)
    return [first + zlib.crc32(w.encode()) % (TINY_LM.vocab_size - first) for w in text.split()]


SPECIAL_IDS = {token: i for i, token in enumerate(st.ALL_SPECIAL_TOKENS)}


def moving_shape_video(rng: random.Random, frames: int, size: int) -> torch.Tensor:
    """(T, 3, size, size) uint8: a plain background and a square crossing it, a static camera."""
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = [rng.randrange(256) for _ in range(3)]
    side, y = size // 4, rng.randrange(0, size - size // 4)
    colour = [rng.randrange(256) for _ in range(3)]
    for t in range(frames):
        x = round(t * (size - side) / max(1, frames - 1))
        video[t, y:y + side, x:x + side] = colour
    return torch.from_numpy(video).permute(0, 3, 1, 2).contiguous()


def tiny_samples(q: float, tokens_per_frame: int) -> list[Sample]:
    """The same videos and conversations at every q (seeded per video); only the kept count differs."""
    samples = []
    for i in range(TINY_VIDEOS):
        rng = random.Random(SEED * 1000 + i)
        tiles = moving_shape_video(rng, TINY_FRAMES, TINY_VISION.image_size)
        labels = tuple(frame_label(t, t / FPS) for t in range(TINY_FRAMES))
        kept = kept_token_count(TINY_FRAMES, tokens_per_frame, q)
        slot = MediaSlot("video", TINY_FRAMES, tokens_per_frame, labels, kept_tokens=kept)
        answer = " ".join(rng.choice(("a", "square", "moves", "left", "to", "right", "across", "the", "frame"))
                          for _ in range(rng.randint(20, 60)))
        messages = [Message("user", "<video> What happens in this video?"), Message("assistant", answer)]
        ids, labels_out, spans = tokenize_with_media_spans(messages, [slot], word_encode, SPECIAL_IDS)
        (start, length), = spans
        samples.append(Sample(np.asarray(ids, dtype=np.int64), np.asarray(labels_out, dtype=np.int64), tiles,
                              "bench", f"v{i}",
                              video_evs=np.array([[0, TINY_FRAMES, kept, start, length]], dtype=np.int64)))
    return samples


def measure_tiny() -> list[dict]:
    from train.model.vlm import VisionLanguageModel

    cfg = ModelConfig(language_model=TINY_LM, vision=TINY_VISION, projector=ProjectorConfig(hidden_size=256))
    torch.manual_seed(SEED)
    results = []
    for q in QS:
        model = VisionLanguageModel(cfg, image_token_id=SPECIAL_IDS[st.IMG_CONTEXT],
                                    image_end_id=SPECIAL_IDS[st.IMG_END])
        model.reset_parameters(SEED)
        model.vision_model.requires_grad_(False)  # stage 2 trains the LM and projector
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        samples = tiny_samples(q, cfg.tokens_per_tile)
        packer = Packer(TINY_SEQ_LENGTH)
        for s in samples:
            packer.add(s)
        rows = []
        while packer.buffer:
            rows.append(packer.pop_row())
        batches = [collate_rows([row], TINY_SEQ_LENGTH, SPECIAL_IDS[st.PAD]) for row in rows]
        supervised = sum(b.num_supervised_tokens for b in batches)

        def step() -> float:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            for b in batches:
                loss, _ = model(b)
                (loss / supervised).backward()
            optimizer.step()
            return time.perf_counter() - start

        def encode_media() -> float:  # the part EVS cannot shrink: every frame through the ViT
            start = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    model.embed_media(b.tiles)
            return time.perf_counter() - start

        step()  # warm-up
        seconds = min(step() for _ in range(REPEATS))
        media_seconds = min(encode_media() for _ in range(REPEATS))
        lengths = [s.length for s in samples]
        flops = sum(training_flops(TINY_LM, [[s.length for s in row] for row in rows], TINY_SEQ_LENGTH,
                                   supervised).values())
        results.append({"q": q, "videos": len(samples), "tokens": int(sum(lengths)), "rows": len(rows),
                        "media_tokens": int(sum(s.video_evs[0, 2] for s in samples)),
                        "step_seconds": seconds, "media_forward_seconds": media_seconds,
                        "rest_seconds": seconds - media_seconds, "lm_flops": flops})
    add_ratios(results, ("media_tokens", "tokens", "rows", "lm_flops", "step_seconds", "rest_seconds"))
    return results


# ---- the benchmark ------------------------------------------------------------------------

def recipe_lm() -> LanguageModelConfig:
    from train.config.compose import compose_raw
    from train.config.schema import from_dict

    return from_dict(ModelConfig, compose_raw("stage2_video_sft")["model"]).language_model


def run() -> dict:
    lm = recipe_lm()
    return {
        "name": NAME,
        "config": {"qs": list(QS), "seed": SEED, "num_videos": NUM_VIDEOS, "seq_length": SEQ_LENGTH,
                   "rows_per_step": ROWS_PER_STEP, "fps": FPS, "max_frames": MAX_FRAMES,
                   "tokens_per_frame": TOKENS_PER_FRAME, "frame_overhead_tokens": FRAME_OVERHEAD,
                   "lm_pattern": lm.pattern, "tiny": {"videos": TINY_VIDEOS, "frames": TINY_FRAMES,
                                                      "seq_length": TINY_SEQ_LENGTH, "repeats": REPEATS}},
        "analytic_12b": analytic_12b(lm),
        "measured_tiny_cpu": measure_tiny(),
    }


def render(data: dict) -> str:
    c = data["config"]
    lines = [f"EVS, analytic LM training FLOPs of the 12B recipe LM: {c['num_videos']} videos "
             f"({c['fps']:g} fps, <= {c['max_frames']} frames, {c['tokens_per_frame']} tokens/frame), "
             f"packed into {c['seq_length']:,}-token rows, a step = {c['rows_per_step']} rows",
             f"{'q':>5}  {'media tok':>12}  {'tokens':>12}  {'steps':>6}  {'fill':>7}  {'PFLOP/epoch':>12}  "
             f"{'PFLOP/step':>10}  {'TFLOP/video':>11}  {'attn share':>10}  {'media x':>7}  {'tokens x':>8}  "
             f"{'steps x':>7}  {'FLOPs x':>7}  {'no-pad x':>8}"]
    for r in data["analytic_12b"]:
        parts = r["flops_by_part"]
        attn = (parts["attention_scores"] + parts["attention_proj"]) / r["lm_flops_epoch"]
        x = r["ratio"]
        lines.append(f"{r['q']:>5.2f}  {r['media_tokens']:>12,}  {r['tokens']:>12,}  {r['steps']:>6.1f}  "
                     f"{r['fill']:>7.2%}  "
                     f"{r['lm_flops_epoch'] / 1e15:>12,.0f}  {r['lm_flops_per_step'] / 1e15:>10.2f}  "
                     f"{r['lm_flops_per_video'] / 1e12:>11.1f}  {attn:>10.1%}  {x['media_tokens']:>7.3f}  "
                     f"{x['tokens']:>8.3f}  {x['rows']:>7.3f}  {x['lm_flops_epoch']:>7.3f}  "
                     f"{x['lm_flops_real_tokens']:>8.3f}")
    t = c["tiny"]
    lines += ["", f"EVS, measured training steps on CPU (small model, {t['videos']} videos x {t['frames']} frames x 64 "
                  f"tokens, {t['seq_length']}-token rows; one step = all their rows; best of {t['repeats']})",
              f"{'q':>5}  {'media tok':>9}  {'tokens':>7}  {'rows':>4}  {'step s':>7}  {'ViT fwd s':>9}  "
              f"{'GFLOP (LM)':>10}  {'media x':>7}  {'tokens x':>8}  {'rows x':>6}  {'FLOPs x':>7}  {'time x':>6}  "
              f"{'non-ViT x':>9}"]
    for r in data["measured_tiny_cpu"]:
        x = r["ratio"]
        lines.append(f"{r['q']:>5.2f}  {r['media_tokens']:>9,}  {r['tokens']:>7,}  {r['rows']:>4}  "
                     f"{r['step_seconds']:>7.3f}  {r['media_forward_seconds']:>9.3f}  {r['lm_flops'] / 1e9:>10.1f}  "
                     f"{x['media_tokens']:>7.3f}  {x['tokens']:>8.3f}  {x['rows']:>6.3f}  {x['lm_flops']:>7.3f}  "
                     f"{x['step_seconds']:>6.3f}  {x['rest_seconds']:>9.3f}")
    lines += [
        "x = ratio to q = 0 in this run. FLOPs: forward + backward (3x forward) over packed rows, padding included",
        "(no-pad x: over the samples' own tokens only). A step is a fixed number of full rows, so PFLOP/step stays",
        "flat: EVS shows as fewer steps (and LM FLOPs) for the same videos, PFLOP/epoch and TFLOP/video.",
        "Measured: the ViT still encodes every frame (EVS prunes after the projector), so step time falls less than",
        "LM FLOPs where the ViT's share is large (non-ViT x: step minus the ViT+projector forward); rows fall in",
        "whole rows, so a small run moves in coarse jumps.",
    ]
    return "\n".join(lines)

