"""What `python -m train.chat` runs on: a trained VLM loaded from its run, and prompts rendered
exactly as training renders a conversation (chat template, image tiling, video frame sampling and
frame labels, `/think` or `/no_think`, the empty `<think></think>` of reasoning-off answers)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import (
    MediaSlot,
    Message,
    TemplateFn,
    apply_reasoning_mode,
    frame_label,
    placeholder_order,
    template_segments,
    tokenize_conversation,
)
from data_pipelines.training.decode import decode_image, decode_video, frames_to_tiles
from data_pipelines.training.samples import Tokenizer
from data_pipelines.training.tiling import tile_image
from train.checkpoint.files import read_run_config, resolve_native_checkpoint
from train.config.schema import Config, KernelConfig, PrecisionConfig
from train.engines.assembly import assemble
from train.model.vlm import VisionLanguageModel
from train.parallel.distributed import DistInfo

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
    cfg = read_run_config(run_dir)
    tokenizer_path = tokenizer_path or cfg.data.tokenizer
    if not tokenizer_path or not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"tokenizer {tokenizer_path!r} (data.tokenizer in {run_dir / 'config.yaml'}) does not exist: "
                                f"pass --tokenizer DIR")
    tokenizer = Tokenizer.load(tokenizer_path)
    # Generation runs the native model with the torch reference ops in fp32 whatever the run trained
    # with (checkpoints hold the native layout), so a run trained with GPU kernels or on megatron-core
    # also chats where their libraries are not installed.
    cfg.model.kernels, cfg.model.impl, cfg.model.compile = KernelConfig(), "native", False
    cfg.precision = PrecisionConfig()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    model = assemble(cfg, info, tokenizer.special_ids, train=False, weights_from=checkpoint).model
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
    tiling = d.tiling
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
    # Training starts every reasoning-off answer with an empty think; a template that already
    # opens the turn with it (as the released one does under /no_think) must not get a second.
    empty_think = st.THINK_OPEN + st.THINK_CLOSE
    if not reasoning_on and not header.endswith(empty_think):
        header += empty_think
    ids += tokenizer.encode(header)
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
