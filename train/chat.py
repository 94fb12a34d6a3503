"""`python -m train.chat --ckpt DIR [--image F]... [--video F]... --prompt TEXT [--think]`: greedy chat.

Loads a run's `config.yaml` and model weights (`--ckpt` is a run dir, its `checkpoints/` dir or a
`step_N` dir), renders the prompt exactly as training renders a conversation (chat template,
image tiling, video frame sampling and frame labels, `/think` or `/no_think` in the system prompt
and, with reasoning off, the empty `<think></think>` that opens every trained answer), then
greedy-decodes with the Mamba and attention caches of `train.generate`, writing text to stdout as
it comes. Timing goes to stderr.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from data_pipelines import special_tokens as st
from data_pipelines.conversation import (
    MediaSlot, Message, TemplateFn, apply_reasoning_mode, frame_label, placeholder_order, template_segments,
    tokenize_conversation,
)
from data_pipelines.decode import MediaDecodeError, decode_image, decode_video, frames_to_tiles
from data_pipelines.samples import Tokenizer
from data_pipelines.tiling import TilingConfig, tile_image
from train.api import resolve_native_checkpoint
from train.checkpoint import load_model_weights
from train.config import Config, KernelConfig, from_dict
from train.generate import greedy_tokens, prompt_embeddings
from train.model.vlm import VisionLanguageModel

BUILTIN_ASSISTANT_HEADER = f"{st.IM_START}assistant\n"


@dataclass
class ChatModel:
    cfg: Config
    model: VisionLanguageModel
    tokenizer: Tokenizer


def load_chat_model(path: str | Path, tokenizer_path: str | None = None, device: str = "cpu") -> ChatModel:
    """The run's VLM (fp32, eval mode) with the weights of its newest complete checkpoint (or the one named)."""
    path = Path(path)
    try:
        checkpoint, run_dir = resolve_native_checkpoint(path)
    except FileNotFoundError:
        if (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a transformers directory: convert it first with "
                                    f"`python -m train.convert hf-to-native --src {path} --dst DIR`") from None
        raise
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: a native checkpoint needs its run's config.yaml")
    cfg = from_dict(Config, yaml.safe_load(config_file.read_text()))
    tokenizer_path = tokenizer_path or cfg.data.tokenizer
    if not tokenizer_path or not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"tokenizer {tokenizer_path!r} (data.tokenizer in {config_file}) does not exist: "
                                f"pass --tokenizer DIR")
    tokenizer = Tokenizer.load(tokenizer_path)
    # Generation computes with the torch reference ops whatever the run trained with, so a run
    # trained with GPU kernels also chats where their libraries are not installed.
    cfg.model.kernels = KernelConfig()
    with torch.device(device):  # built where it runs: no host copy of a large model
        model = VisionLanguageModel(cfg.model, image_token_id=tokenizer.special_ids[st.IMG_CONTEXT])
    load_model_weights(checkpoint, model)
    return ChatModel(cfg, model.eval(), tokenizer)


def generation_header(messages: list[Message], template: TemplateFn | None) -> str | None:
    """What opens the assistant's turn under `template`, as training splits it (`template_segments`);
    None when training would have fallen back to the built-in rendering."""
    if template is None or template_segments(messages, template) is None:
        return None
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    rendered, opened = template(dicts, False), template(dicts, True)
    return opened[len(rendered):] if opened.startswith(rendered) else None


def media_inputs(kinds: list[str], images: list[bytes], videos: list[bytes], cfg: Config
                 ) -> tuple[list[MediaSlot], torch.Tensor]:
    """Slots and uint8 tiles (N, 3, T, T) in placeholder order, tiled and sampled as in training."""
    d = cfg.data
    tiling = TilingConfig(tile_size=d.tile_size, min_tiles=d.min_tiles, max_tiles=d.max_tiles,
                          use_thumbnail=d.use_thumbnail)
    tokens_per_tile = cfg.model.tokens_per_tile
    image_iter, video_iter = iter(images), iter(videos)
    slots, tiles = [], []
    for kind in kinds:
        if kind == "image":
            image = decode_image(next(image_iter), target_pixels=d.tile_size ** 2 * (d.max_tiles + 1))
            tiles.append(tile_image(image, tiling))
            slots.append(MediaSlot("image", tiles[-1].shape[0], tokens_per_tile))
        else:
            video = decode_video(next(video_iter), target_fps=d.video_fps, max_frames=d.max_frames)
            tiles.append(frames_to_tiles(video.frames, d.tile_size))
            labels = tuple(frame_label(i, t) for i, t in enumerate(video.timestamps))
            slots.append(MediaSlot("video", len(labels), tokens_per_tile, labels))
    empty = torch.zeros(0, 3, d.tile_size, d.tile_size, dtype=torch.uint8)
    return slots, torch.cat(tiles) if tiles else empty


def build_prompt(prompt: str, images: list[bytes], videos: list[bytes], think: bool, system: str,
                 cfg: Config, tokenizer: Tokenizer) -> tuple[list[int], torch.Tensor]:
    """Token ids of the conversation so far plus the opened assistant turn, and the media tiles.

    Without `<image>` / `<video>` placeholders in `prompt`, the images then the videos go before
    the text, one per line, as in the training data.
    """
    if placeholder_order([Message("user", prompt)]):
        content = prompt
    else:
        content = f"{st.IMAGE_PLACEHOLDER}\n" * len(images) + f"{st.VIDEO_PLACEHOLDER}\n" * len(videos) + prompt
    messages = ([Message("system", system)] if system else []) + [Message("user", content)]
    # Ratio 1 or 0 makes the draw certain: the system prompt gets the marker training would write.
    # A marker already in `system` wins over --think, as it does in training.
    messages = apply_reasoning_mode(messages, 1.0 if think else 0.0, random.Random(0))
    reasoning_on = st.REASONING_OFF not in messages[0].content
    kinds = placeholder_order(messages)
    if (kinds.count("image"), kinds.count("video")) != (len(images), len(videos)):
        raise ValueError(f"the prompt has {kinds.count('image')} {st.IMAGE_PLACEHOLDER} and {kinds.count('video')} "
                         f"{st.VIDEO_PLACEHOLDER} placeholders for {len(images)} images and {len(videos)} videos")
    slots, tiles = media_inputs(kinds, images, videos, cfg)
    template = tokenizer.template(cfg.data.chat_template)
    header = generation_header(messages, template)
    if header is None:
        template, header = None, BUILTIN_ASSISTANT_HEADER
    ids, _ = tokenize_conversation(messages, slots, tokenizer.encode, tokenizer.special_ids, template)
    ids += tokenizer.encode(header)
    if not reasoning_on:
        ids += tokenizer.encode(st.THINK_OPEN + st.THINK_CLOSE)
    return ids, tiles


class TextStream:
    """Token ids -> text as they come, holding back a byte-level token that ends mid-character."""

    def __init__(self, tokenizer: Tokenizer):
        self.hf = tokenizer.hf
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.hf.decode(self.ids, skip_special_tokens=False)
        return "" if text.endswith("\ufffd") else self._new(text)

    def finish(self) -> str:
        """Whatever is still held back."""
        return self._new(self.hf.decode(self.ids, skip_special_tokens=False))

    def _new(self, text: str) -> str:
        new, self.shown = text[self.shown:], len(text)
        return new


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, or a step_N dir")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeatable)")
    parser.add_argument("--video", action="append", default=[], type=Path, help="a video file (repeatable)")
    parser.add_argument("--think", action="store_true", help="reasoning mode (/think); default /no_think")
    parser.add_argument("--system", default="", help="system prompt (the reasoning marker is added to it)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tokenizer", help="tokenizer dir (default: data.tokenizer of the run's config)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        chat = load_chat_model(args.ckpt, args.tokenizer, device)
        ids, tiles = build_prompt(args.prompt, [p.read_bytes() for p in args.image],
                                  [p.read_bytes() for p in args.video], args.think, args.system, chat.cfg,
                                  chat.tokenizer)
    except (OSError, MediaDecodeError, ValueError) as err:  # ValueError includes config errors
        print(f"chat error: {err}", file=sys.stderr)
        return 2

    special = chat.tokenizer.special_ids
    stop_ids = {special[st.IM_END], special[st.EOS]}
    stream = TextStream(chat.tokenizer)
    started = time.perf_counter()
    embeds = prompt_embeddings(chat.model, torch.tensor([ids], device=device), tiles.to(device))
    count, first_at, last_at = 0, None, started
    for token in greedy_tokens(chat.model.language_model, embeds, args.max_new_tokens, stop_ids):
        count, last_at = count + 1, time.perf_counter()
        first_at = first_at or last_at
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()

    total = last_at - started
    rate = f"{count / total:.1f} tokens/s" if count else "no tokens"
    decode = f", decode {(count - 1) / (last_at - first_at):.1f} tokens/s" if count > 1 else ""
    prefill = f"prefill {first_at - started:.2f}s" if first_at else "stopped at once"
    print(f"[chat] prompt {len(ids)} tokens ({tiles.shape[0]} tiles), {prefill}; {count} new tokens in {total:.2f}s "
          f"= {rate}{decode}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
